"""The host's PostgreSQL server: `server(host, name)` gives the provider registered under that name."""
from __future__ import annotations

from typing import TYPE_CHECKING

from worktreebox.providers import choose

if TYPE_CHECKING:
    from worktreebox.context import HostContext
    from worktreebox.providers.postgres.base import Server


def provider_name(host: HostContext, provider: str | None = None) -> str:
    """`provider` (a repo's [database] provider, or what a box recorded), else the host's (which
    is the external server when config.toml or the environment gives only its URL: host.py)."""
    return provider or host.config.database_provider


def server(host: HostContext, provider: str | None = None) -> Server:
    """The server boxes of `host` use (never starts it: the first connection that fails does)."""
    return choose("postgres", provider_name(host, provider)).from_host(host)
