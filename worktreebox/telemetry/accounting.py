"""What each box uses right now (`wtbox top`): CPU, memory, tasks and I/O per box.

From the box's cgroup when it has one (exact, and a few file reads per box); otherwise
from the processes `rm` would stop (WTBOX_ID / cwd), which is slower and misses escapees.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worktreebox.system import cgroups, procs

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.context import HostContext

SAMPLE_INTERVAL = 0.5  # seconds between the two CPU readings a percentage is made of


def usage_of(home: Path | str, box: Box) -> tuple[cgroups.Usage, str]:
    """(usage, where it came from: "cgroup" or "processes")."""
    backend = cgroups.for_home(home)
    if backend is not None and backend.exists(box.id):
        usage = backend.usage(box.id)
        if usage is not None:
            return usage, "cgroup"
    import psutil

    cpu, rss, n = 0.0, 0, 0
    for p in procs.find_box_processes(box.id, box.dir):
        try:
            with p.oneshot():
                t = p.cpu_times()
                cpu += t.user + t.system
                rss += p.memory_info().rss
                n += p.num_threads()
        except psutil.Error:
            continue
    return cgroups.Usage(cpu_seconds=cpu, memory_bytes=rss, memory_peak_bytes=None, pids=n), "processes"


def sample(host: HostContext, interval: float = SAMPLE_INTERVAL) -> list[dict[str, Any]]:
    """One row per box, busiest first: CPU % over `interval` (100 = one core), memory, tasks, ports, state."""
    boxes = host.list()
    t0 = time.monotonic()
    first = {b.id: usage_of(host.home, b)[0].cpu_seconds for b in boxes}
    time.sleep(max(0.0, interval - (time.monotonic() - t0)))
    elapsed = time.monotonic() - t0
    rows: list[dict[str, Any]] = []
    backend = cgroups.for_home(host.home)
    for b in boxes:
        usage, source = usage_of(host.home, b)
        limits = b.data.get("cgroup") or {}
        rows.append({
            "id": b.id, "task": b.task, "state": b.state,
            # processes that ended between the readings take their CPU time with them: never below 0
            "cpu_percent": round(max(0.0, usage.cpu_seconds - first.get(b.id, 0.0)) * 100 / elapsed, 1),
            "cpu_seconds": round(usage.cpu_seconds, 3),
            "memory_bytes": usage.memory_bytes, "memory_peak_bytes": usage.memory_peak_bytes,
            "memory_max": limits.get("memory_max"), "pids": usage.pids, "pids_max": limits.get("pids_max"),
            "cpu_weight": limits.get("cpu_weight"),
            "io_read_bytes": usage.io_read_bytes, "io_write_bytes": usage.io_write_bytes,
            "ports": dict(b.ports), "source": source,
            # it keeps every CPU busy, so it gets what the other boxes leave (background.py)
            "background": bool(backend and backend.background(b.id)),
        })
    rows.sort(key=lambda r: (-r["cpu_percent"], r["id"]))
    return rows
