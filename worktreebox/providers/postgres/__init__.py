"""The host's PostgreSQL server: `server(host, name)` gives the provider registered under that name."""
from __future__ import annotations

from typing import TYPE_CHECKING

from worktreebox.providers import choose

if TYPE_CHECKING:
    from worktreebox.context import HostContext
    from worktreebox.providers.postgres.base import Server


def provider_name(host: HostContext, provider: str | None = None) -> str:
    """`provider` (a repo's [database] provider, or what a box recorded), else the host's:
    external when a URL is configured and nothing else was asked for."""
    cfg = host.config
    provider = provider or cfg.database_provider
    if provider not in ("embedded", "docker") and cfg.database_url:
        return "external"
    return provider or "embedded"


def server(host: HostContext, provider: str | None = None) -> Server:
    """The server boxes of `host` use (never starts it: the first connection that fails does)."""
    return choose("postgres", provider_name(host, provider)).from_host(host)
