"""wtbox's built-in collector: the supervisor calls tick() every few seconds.

Pushes service state, process-tree CPU/RSS, the box's cgroup accounting (CPU, memory,
pids, I/O, OOM kills) and log record counts of one box into that box's VictoriaMetrics
through the import API. Names and help texts: observability/metrics.toml.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from worktreebox.system import cgroups
from worktreebox.telemetry.exposition import exposition, metric_specs
from worktreebox.telemetry.vmclient import push_prometheus


class Collector:
    """Measures one box; keep one instance alive so log counting stays incremental."""

    def __init__(self, box_id: str, metrics_url: str, logs_dir: Path | str, *, count_logs: bool | None = None,
                 home: Path | str | None = None) -> None:
        self.box_id = box_id
        self.cgroups = cgroups.for_home(home) if home is not None else None
        self.metrics_url = metrics_url
        self.logs_dir = Path(logs_dir)
        # When a per-box Vector runs, it counts log records; counting here too would double them.
        self._count_logs = count_logs
        self._offsets: dict[str, tuple[int, int]] = {}  # service → (inode, byte offset)
        self._partial: dict[str, bytes] = {}
        self._counts: dict[tuple[str, str], int] = {}
        self._seed = metric_specs()["wtbox_log_records_total"].get("seed_levels", [])

    def tick(self, services: list[dict[str, Any]]) -> None:
        """Measure and push once. services: [{"name", "pids", "up", "ready_seconds", "restarts"}]."""
        text = exposition(self.samples(services), timestamp_ms=int(time.time() * 1000))
        push_prometheus(self.metrics_url, text)

    def samples(self, services: list[dict[str, Any]]) -> list[tuple[str, dict[str, str], float]]:
        out: list[tuple[str, dict[str, str], float]] = []
        for s in services:
            labels = {"box": self.box_id, "service": s["name"]}
            out.append(("wtbox_service_up", labels, 1 if s.get("up") else 0))
            if s.get("ready_seconds") is not None:
                out.append(("wtbox_service_ready_seconds", labels, float(s["ready_seconds"])))
            out.append(("wtbox_service_restarts_total", labels, int(s.get("restarts") or 0)))
            cpu, rss = process_tree_usage(s.get("pids") or [])
            out.append(("wtbox_process_cpu_seconds_total", labels, cpu))
            out.append(("wtbox_process_resident_memory_bytes", labels, rss))
        out += self.box_samples()
        if self.counting_logs():
            for s in services:
                self._read_new_records(s["name"])
            for (service, level), n in sorted(self._counts.items()):
                out.append(("wtbox_log_records_total", {"box": self.box_id, "service": service, "level": level}, n))
        return out

    def box_samples(self) -> list[tuple[str, dict[str, str], float]]:
        """The whole box, from its cgroup: CPU, memory, pids, I/O, and OOM kills per leaf."""
        usage = self.cgroups.usage(self.box_id) if self.cgroups else None
        if usage is None or self.cgroups is None:
            return []
        box = {"box": self.box_id}
        out = [("wtbox_box_cpu_seconds_total", box, usage.cpu_seconds)]
        for name, value in (("wtbox_box_memory_bytes", usage.memory_bytes),
                            ("wtbox_box_memory_peak_bytes", usage.memory_peak_bytes), ("wtbox_box_pids", usage.pids),
                            ("wtbox_box_io_read_bytes_total", usage.io_read_bytes),
                            ("wtbox_box_io_write_bytes_total", usage.io_write_bytes)):
            if value is not None:
                out.append((name, box, value))
        for leaf, n in sorted(self.cgroups.oom_kills(self.box_id).items()):
            out.append(("wtbox_box_oom_kills_total", {**box, "service": leaf}, n))
        return out

    def counting_logs(self) -> bool:
        if self._count_logs is not None:
            return self._count_logs
        return not (self.logs_dir.parent / "run" / "vector.pid").exists()

    def _read_new_records(self, service: str) -> None:
        """Count the complete lines appended to logs/<service>.jsonl since the last tick."""
        for level in self._seed:
            self._counts.setdefault((service, level), 0)
        path = self.logs_dir / f"{service}.jsonl"
        try:
            f = open(path, "rb")
        except OSError:
            return
        with f:
            st = os.fstat(f.fileno())
            inode, offset = self._offsets.get(service, (st.st_ino, 0))
            if inode != st.st_ino or st.st_size < offset:
                # Rotated or truncated: the new file starts from zero; counts stay cumulative.
                offset, self._partial[service] = 0, b""
            f.seek(offset)
            # In blocks: the first tick of a restarted supervisor may read a large file.
            while chunk := f.read(READ_BLOCK):
                offset += len(chunk)
                lines = (self._partial.pop(service, b"") + chunk).split(b"\n")
                self._partial[service] = lines.pop()  # an unfinished last line waits for more
                for line in lines:
                    if line.strip():
                        key = (service, _level(line))
                        self._counts[key] = self._counts.get(key, 0) + 1
        self._offsets[service] = (st.st_ino, offset)


READ_BLOCK = 1 << 20
_LEVEL_KEY = b'"level": "'


def _level(line: bytes) -> str:
    """The level of one record; the writer's fixed key order allows a substring fast path."""
    i = line.find(_LEVEL_KEY)
    if i >= 0:
        j = line.find(b'"', i + len(_LEVEL_KEY))
        if j > 0:
            return line[i + len(_LEVEL_KEY):j].decode(errors="replace").lower() or "info"
    try:
        return str(json.loads(line).get("level") or "info").lower()
    except (ValueError, AttributeError):
        return "unknown"


def process_tree_usage(pids: list[int]) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) summed over the live processes under the given root pids."""
    import psutil

    seen: set[int] = set()
    cpu, rss = 0.0, 0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for p in procs:
            if p.pid in seen:
                continue
            seen.add(p.pid)
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    cpu += t.user + t.system
                    rss += p.memory_info().rss
            except psutil.Error:
                continue
    return cpu, rss
