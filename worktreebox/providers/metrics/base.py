"""The metrics store interface (one VictoriaMetrics per box) and the flags every store runs with.

A store serves http://127.0.0.1:<the box's metrics port> and is spoken to through
`vmclient`, whichever provider runs it. Detached host processes a store starts are named
in `processes`/`pid_files`, so the metrics resource stops them together with the box's
other detached processes in one staged stop; `remove` takes what outlives them.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.context import HostContext
    from worktreebox.system import procs

# Idle RSS of VictoriaMetrics 1.79.5 on our 2-core host after a push of 20 series and a query,
# 5 s idle (min-max of 2 runs; start→/health in brackets):
#   defaults                                       25.1-25.4 MB (51 ms)
#   -memory.allowedPercent=5                       19.7 MB      (42 ms)
#   -memory.allowedPercent=1                       19.0-19.2 MB (41 ms)
#   -memory.allowedBytes=16MiB                     18.7-18.8 MB (55 ms)
#   16MiB + GOMAXPROCS=1                           18.4-18.5 MB (45 ms)
#   16MiB + 1 merge worker + 2 queries + GOMAXPROCS=1  18.5-18.7 MB (33 ms)
# GOGC=50 made no difference. The caches, not the heap floor, are what the flags bound; a box
# holds a few hundred series, so the smallest caches and one OS thread lose nothing measurable.
MEMORY_FLAGS = [
    "-memory.allowedBytes=16MiB",
    "-search.maxConcurrentRequests=2",
    "-smallMergeConcurrency=1",
    "-bigMergeConcurrency=1",
]
MEMORY_ENV = {"GOMAXPROCS": "1"}


def retention_flag(retention: str) -> str:
    """wtbox.toml retention ("2d", "12h") → a -retentionPeriod value; VictoriaMetrics keeps at least a day."""
    from worktreebox.config.load import parse_duration

    hours = max(24, round(parse_duration(retention, where="[observability] retention") / 3600))
    return f"{hours}h"


def flags(port: int, storage: str | Path, retention: str, scrape_config: str | Path | None) -> list[str]:
    """VictoriaMetrics' command line flags, the same for the native process and the container."""
    out = [
        f"-httpListenAddr=127.0.0.1:{port}",
        f"-storageDataPath={storage}",
        f"-retentionPeriod={retention_flag(retention)}",
        "-loggerLevel=WARN",
        # Data is pushed or scraped locally: show it after 1 s instead of VictoriaMetrics' 30 s.
        "-search.latencyOffset=1s",
        # Down services show up as up == 0 and on /targets; don't fill the log every interval.
        "-promscrape.suppressScrapeErrors",
        *MEMORY_FLAGS,
    ]
    if scrape_config is not None:
        out.append(f"-promscrape.config={scrape_config}")
    return out


class MetricsStore:
    """One provider of the box's metrics store; constructed per host, told the box per call."""

    name = "store"
    processes: tuple[str, ...] = ()  # names of detached host processes it starts (WTBOX_ID in their env)
    pid_files: tuple[str, ...] = ()  # their pid files under the box's run dir

    def __init__(self, host: HostContext) -> None:
        self.host = host

    @classmethod
    def check(cls) -> dict[str, Any] | None:
        """`wtbox doctor`'s line for what this provider needs installed (None: nothing)."""
        return None

    def start(self, box: Box, port: int, *, scrape_config: Path | None, retention: str,
              inside: int | None = None, launcher: procs.Launcher | None = None) -> str:
        """Start the box's store and wait until it answers on `port`; returns its URL. Idempotent.
        A sandboxed box's store listens on `inside` in the box's network (started with `launcher`),
        reached on `port` through the box's forward."""
        raise NotImplementedError

    def remove(self, box: Box) -> None:
        """Remove what outlives the store's processes (containers, volumes); idempotent."""

    def discover(self) -> set[str]:
        """Box ids that own such a thing (beyond processes) right now."""
        return set()

    def status(self, box: Box) -> dict[str, Any]:
        """Provider facts for `wtbox status`."""
        return {"provider": self.name}
