"""cgroup v2: one unified tree; a box's limits, kill and freeze in the files of its one directory."""
from __future__ import annotations

import os
import select
from collections.abc import Callable
from pathlib import Path

from worktreebox.system.cgroups.base import CGROUP_FS, Cgroups, Limits, Usage
from worktreebox.system.cgroups.files import keyed, read, to_int, wait_until, write_if


class CgroupsV2(Cgroups):
    version = "v2"
    CONTROLLERS = ("cpu", "memory", "pids", "io")

    def __init__(self, base: Path, key: str, outside: Path, mount: Path = CGROUP_FS) -> None:
        super().__init__([base], [mount], [outside], key)
        self.enabled: set[str] = set()
        self.missing = [c for c in self.CONTROLLERS if c not in read(base / "cgroup.controllers").split()]

    def _prepare_base(self, base: Path) -> None:
        # Each level passes the controllers down (subtree_control) before its children can use them.
        self.enabled = self._enable(base, set(self.CONTROLLERS))
        self.missing = [c for c in self.CONTROLLERS if c not in self.enabled]

    def _prepare_box(self, box_id: str) -> None:
        self._enable(self.box_dirs(box_id)[0], self.enabled)

    @staticmethod
    def _enable(d: Path, wanted: set[str]) -> set[str]:
        """Turn on in d's subtree_control what d has; the controllers d's children get."""
        have = set(read(d / "cgroup.controllers").split())
        on = set(read(d / "cgroup.subtree_control").split())
        for c in sorted((wanted & have) - on):
            try:
                (d / "cgroup.subtree_control").write_text(f"+{c}")
                on.add(c)
            except OSError:  # processes in d (no-internal-process rule), or not delegated
                pass
        return on & wanted

    def set_limits(self, box_id: str, limits: Limits) -> None:
        d = self.box_dirs(box_id)[0]
        if limits.cpu_weight is not None:
            write_if(d / "cpu.weight", limits.cpu_weight)
        if limits.memory_max is not None:
            write_if(d / "memory.max", limits.memory_max)
            write_if(d / "memory.swap.max", 0)  # a box at its limit is killed, not swapped to death
        if limits.pids_max is not None:
            write_if(d / "pids.max", limits.pids_max)

    def limits(self, box_id: str) -> Limits:
        d = self.box_dirs(box_id)[0]
        return Limits(cpu_weight=to_int(read(d / "cpu.weight")), memory_max=to_int(read(d / "memory.max")),
                      pids_max=to_int(read(d / "pids.max")))

    def _kill_at_once(self, box_id: str, leaf: str | None) -> bool:
        try:
            # One write kills the whole subtree, forks included (Linux 5.14+).
            (self.box_dirs(box_id, leaf)[0] / "cgroup.kill").write_text("1")
            return True
        except OSError:
            return False

    def _freeze(self, box_id: str, leaf: str | None, on: bool) -> bool:
        d = self.box_dirs(box_id, leaf)[0]
        try:
            (d / "cgroup.freeze").write_text("1" if on else "0")
        except OSError:
            return False
        if on:
            wait_until(lambda: "frozen 1" in read(d / "cgroup.events"), 1.0)
        return True

    def _is_frozen(self, box_id: str, leaf: str) -> bool:
        return read(self.box_dirs(box_id, leaf)[0] / "cgroup.freeze").strip() == "1"

    def usage(self, box_id: str) -> Usage | None:
        d = self.box_dirs(box_id)[0]
        if not d.is_dir():
            return None
        cpu = keyed(read(d / "cpu.stat")).get("usage_usec", 0) / 1e6
        current = to_int(read(d / "memory.current"))
        if current is not None:
            current = max(0, current - keyed(read(d / "memory.stat")).get("inactive_file", 0))
        rd = wr = None
        io = read(d / "io.stat")
        if io or (d / "io.stat").exists():
            rd = wr = 0
            for line in io.splitlines():
                for field in line.split()[1:]:
                    k, _, v = field.partition("=")
                    if k == "rbytes":
                        rd += int(v)
                    elif k == "wbytes":
                        wr += int(v)
        return Usage(cpu_seconds=cpu, memory_bytes=current, memory_peak_bytes=to_int(read(d / "memory.peak")),
                     pids=to_int(read(d / "pids.current")) if (d / "pids.current").exists() else len(self.pids(box_id)),
                     io_read_bytes=rd, io_write_bytes=wr)

    def oom_event(self, box_id: str) -> Callable[[], bool] | None:
        """memory.events changes (a modified event: poll's POLLPRI); its oom_kill counts every leaf."""
        path = self.box_dirs(box_id)[0] / "memory.events"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        poller = select.poll()
        poller.register(fd, select.POLLPRI)
        seen = [keyed(read(path)).get("oom_kill", 0)]

        def wait() -> bool:
            while path.parent.is_dir():
                poller.poll()
                now = keyed(read(path)).get("oom_kill", 0)
                if now != seen[0]:
                    seen[0] = now
                    return True
            return False

        return wait

    def cpu_seconds(self, box_id: str, leaf: str | None = None) -> float | None:
        usec = keyed(read(self.box_dirs(box_id, leaf)[0] / "cpu.stat")).get("usage_usec")
        return usec / 1e6 if usec is not None else None

    def oom_kills(self, box_id: str) -> dict[str, int]:
        out = {}
        for leaf in self.leaves(box_id):
            events = keyed(read(self.box_dirs(box_id, leaf)[0] / "memory.events"))
            if "oom_kill" in events:
                out[leaf] = events["oom_kill"]
        return out
