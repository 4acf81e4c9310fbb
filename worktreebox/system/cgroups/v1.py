"""cgroup v1: one tree per controller (cpu, cpuacct, memory, pids, freezer, blkio), the same box path in each."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from worktreebox.system.cgroups.base import DEFAULT_CPU_WEIGHT, Cgroups, Limits, Usage, key_of
from worktreebox.system.cgroups.files import keyed, read, to_int, wait_until, write_if


class CgroupsV1(Cgroups):
    version = "v1"

    def __init__(self, mounts: dict[str, Path], key: str) -> None:
        # mounts: controller → mount point; co-mounted controllers share one (e.g. cpu,cpuacct).
        unique = list(dict.fromkeys(mounts.values()))
        super().__init__(unique, unique, unique, key)
        self._base_of = dict(mounts)
        self.missing = [c for c in ("cpu", "cpuacct", "memory", "pids", "freezer") if c not in mounts]

    def _dir(self, controller: str, box_id: str, leaf: str | None = None) -> Path | None:
        base = self._base_of.get(controller)
        if base is None:
            return None
        d = base / (self.prefix + key_of(box_id))
        return d / leaf if leaf else d

    def cpu_dir(self, box_id: str) -> Path | None:
        return self._dir("cpu", box_id)

    def set_limits(self, box_id: str, limits: Limits) -> None:
        cpu = self._dir("cpu", box_id)
        if cpu and limits.cpu_weight is not None:
            write_if(cpu / "cpu.shares", max(2, round(limits.cpu_weight * 1024 / DEFAULT_CPU_WEIGHT)))
        mem = self._dir("memory", box_id)
        if mem and limits.memory_max is not None:
            write_if(mem / "memory.limit_in_bytes", limits.memory_max)
            # memory+swap no higher than memory: a box at its limit is killed, not swapped to death.
            write_if(mem / "memory.memsw.limit_in_bytes", limits.memory_max)
        pids = self._dir("pids", box_id)
        if pids and limits.pids_max is not None:
            write_if(pids / "pids.max", limits.pids_max)

    def limits(self, box_id: str) -> Limits:
        cpu, mem, pids = (self._dir(c, box_id) for c in ("cpu", "memory", "pids"))
        shares = to_int(read(cpu / "cpu.shares")) if cpu else None
        mem_max = to_int(read(mem / "memory.limit_in_bytes")) if mem else None
        if mem_max is not None and mem_max >= 1 << 62:  # the kernel's "unlimited" (page-rounded LONG_MAX)
            mem_max = None
        return Limits(cpu_weight=round(shares * DEFAULT_CPU_WEIGHT / 1024) if shares else None, memory_max=mem_max,
                      pids_max=to_int(read(pids / "pids.max")) if pids else None)

    def _freeze(self, box_id: str, leaf: str | None, on: bool) -> bool:
        d = self._dir("freezer", box_id, leaf)
        if d is None:
            return False
        try:
            (d / "freezer.state").write_text("FROZEN" if on else "THAWED")
        except OSError:
            return False
        if on:  # FREEZING until every task stopped; a task in uninterruptible sleep can delay it
            wait_until(lambda: read(d / "freezer.state").strip() == "FROZEN", 1.0)
        return True

    def _is_frozen(self, box_id: str, leaf: str) -> bool:
        d = self._dir("freezer", box_id, leaf)
        return d is not None and read(d / "freezer.state").strip() in ("FROZEN", "FREEZING")

    def usage(self, box_id: str) -> Usage | None:
        if not self.exists(box_id):
            return None
        acct = self._dir("cpuacct", box_id)
        cpu = (to_int(read(acct / "cpuacct.usage")) or 0) / 1e9 if acct else 0.0
        mem = self._dir("memory", box_id)
        current = peak = None
        if mem:
            current = to_int(read(mem / "memory.usage_in_bytes"))
            if current is not None:
                current = max(0, current - keyed(read(mem / "memory.stat")).get("total_inactive_file", 0))
            peak = to_int(read(mem / "memory.max_usage_in_bytes"))
        pids = self._dir("pids", box_id)
        rd = wr = None
        blkio = self._dir("blkio", box_id)
        if blkio:
            rd = wr = 0
            for line in read(blkio / "blkio.throttle.io_service_bytes_recursive").splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[1] == "Read":
                    rd += int(parts[2])
                elif len(parts) == 3 and parts[1] == "Write":
                    wr += int(parts[2])
        return Usage(cpu_seconds=cpu, memory_bytes=current, memory_peak_bytes=peak,
                     pids=to_int(read(pids / "pids.current")) if pids else len(self.pids(box_id)),
                     io_read_bytes=rd, io_write_bytes=wr)

    def oom_event(self, box_id: str) -> Callable[[], bool] | None:
        """memory.oom_control's eventfd (cgroup.event_control): signalled for an OOM in the box,
        and when the cgroup is removed."""
        mem = self._dir("memory", box_id)
        if mem is None:
            return None
        try:
            efd = os.eventfd(0, os.EFD_CLOEXEC)
            ofd = os.open(mem / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
            (mem / "cgroup.event_control").write_text(f"{efd} {ofd}")
        except (OSError, AttributeError):
            return None

        def wait() -> bool:
            try:
                os.eventfd_read(efd)
            except OSError:
                return False
            return mem.is_dir()

        return wait

    def cpu_seconds(self, box_id: str, leaf: str | None = None) -> float | None:
        acct = self._dir("cpuacct", box_id, leaf)
        ns = to_int(read(acct / "cpuacct.usage")) if acct else None
        return ns / 1e9 if ns is not None else None

    def oom_kills(self, box_id: str) -> dict[str, int]:
        # v1 counts a kill only in the victim's own cgroup (the leaf), not in the box above it.
        out: dict[str, int] = {}
        mem = self._dir("memory", box_id)
        if mem is None:
            return out
        for leaf in self.leaves(box_id):
            control = keyed(read(mem / leaf / "memory.oom_control"))
            if "oom_kill" in control:
                out[leaf] = control["oom_kill"]
        return out
