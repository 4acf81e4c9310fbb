"""A box's metrics store: `store(host, name)` gives the provider registered under that name."""
from __future__ import annotations

from typing import TYPE_CHECKING

from worktreebox.providers import choose, names

if TYPE_CHECKING:
    from worktreebox.context import HostContext
    from worktreebox.providers.metrics.base import MetricsStore


def store(host: HostContext, provider: str | None = None) -> MetricsStore:
    """The metrics store named `provider` (a repo's [observability] provider, or what a box
    recorded), else the host's [observability] provider."""
    return choose("metrics", provider or getattr(host.config, "observability_provider", None) or "native")(host)


def every_store(host: HostContext) -> list[MetricsStore]:
    """One of each registered store (for sweeping an orphan whose provider is unknown)."""
    return [choose("metrics", n)(host) for n in names("metrics")]
