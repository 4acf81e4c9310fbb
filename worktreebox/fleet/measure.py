"""What a fan-out measures in each attempt: test counts of a check, services' ready time after a
restart, probes, a browser load, errors in the logs."""
from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

from worktreebox.errors import WtboxError
from worktreebox.resources import metrics
from worktreebox.resources import services as svc
from worktreebox.resources.browser import snapshot
from worktreebox.resources.ports import url_for
from worktreebox.services.client import services_status
from worktreebox.telemetry.logs.reader import available_services, read_records
from worktreebox.telemetry.probe import measure

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.context import HostContext

CHECK_LOG = "check"
# Logs whose errors are not counted as "errors in logs": a failing check is already its own column.
_NOT_COUNTED = {CHECK_LOG, "browser"}  # console errors have their own column (--browse)
PROBE_KEYS = ("url", "n", "answered", "errors", "p50_ms", "p95_ms", "p99_ms", "max_ms", "rps", "recorded")

_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)\b")


def test_counts(lines: list[str]) -> dict[str, int]:
    """pytest-style counts from a summary line ("2 failed, 3 passed, 1 error in 0.1s"); {} when there is none."""
    for line in reversed(lines):
        found = _COUNT.findall(line)
        if found:
            out: dict[str, int] = {}
            for num, word in found:
                key = "errors" if word.startswith("error") else word
                out[key] = out.get(key, 0) + int(num)
            return out
    return {}


test_counts.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def restart_services(host: HostContext, box: Box) -> dict[str, Any]:
    """Restart the box's services (so they run the attempt's code) and time until they are all ready."""
    try:
        cfg = host.repo_config(box)
    except WtboxError as e:
        return {"error": str(e)}
    if not cfg.services:
        return {}
    t0 = time.perf_counter()
    try:
        status = svc.services_restart(host, box)
    except (WtboxError, OSError, ValueError) as e:  # OSError/ValueError: the supervisor went away mid-command
        return {"error": str(e).splitlines()[0], "seconds": round(time.perf_counter() - t0, 3)}
    readies = [s["ready_seconds"] for s in status.values() if s.get("ready_seconds") is not None]
    return {"seconds": round(time.perf_counter() - t0, 3), "ready_seconds": round(max(readies), 3) if readies else None,
            "services": {n: {"state": s.get("state"), "ready_seconds": s.get("ready_seconds")}
                         for n, s in status.items()}}


def run_probe(host: HostContext, box: Box, target: str, n: int, concurrency: int) -> dict[str, Any]:
    """`--probe PATH` of one attempt: the probe's figures (recorded in the box's metrics), or the error."""
    try:
        r = measure(box, url_for(host, box, target), n=n, concurrency=concurrency, wake=metrics.wake)
    except WtboxError as e:
        return {"error": str(e)}
    return {k: r.get(k) for k in PROBE_KEYS}


def browse_attempt(host: HostContext, box: Box, target: str) -> dict[str, Any]:
    """`--browse PATH`: a screenshot in the box dir and the console errors of one load."""
    try:
        url = url_for(host, box, target)
    except WtboxError as e:
        return {"error": str(e), "screenshot": None, "console_errors": None}
    return snapshot(host, box, url, box.dir / "browser" / "fanout.png")


def log_errors(box: Box) -> int | None:
    """Error-level records in the box's logs (services, run, events; not the checks)."""
    if not box.logs_dir.is_dir():
        return None
    names = [s for s in available_services(box.logs_dir) if s not in _NOT_COUNTED and not s.startswith("_")]
    try:
        recs = read_records(box.logs_dir, services=names or ["-"], min_level="error", include_events=True)
    except OSError:
        return None
    return sum(1 for r in recs if r.get("service") not in _NOT_COUNTED)



def current_ready(box: Box) -> dict[str, Any] | None:
    status = services_status(box)
    readies = [s["ready_seconds"] for s in status.values() if s.get("ready_seconds") is not None]
    return {"ready_seconds": max(readies)} if readies else None
