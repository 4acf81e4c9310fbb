"""A box that keeps the CPU busy runs as a background box (cgroup `cpu.idle`) until it calms down.

Fair share (the box's cgroup weight) decides how much CPU each box gets when they compete; it
does not decide how soon a box that was asleep runs when a request wakes it. A box whose
threads are always runnable (a runaway test suite, a busy loop) holds the CPUs, and each
wake-up of a quiet neighbour waits for the running slice or the next tick (4 ms at HZ=250):
on our 2-core host a box's probe p95 rose 1.6-1.8x next to a box spinning 5 processes, with fair
shares intact. A background cgroup (Linux >= 5.15, v1 and v2) gets whatever CPU the others leave
and is preempted at once by their wake-ups: measured on the same host, 0.92x instead of 1.8x.

So a box's supervisor looks at its box's threads (from the box cgroup) every WINDOW seconds.
When they were runnable (on a CPU or waiting for one) for at least BUSY of all the host's CPUs'
time in two looks in a row, i.e. when the box alone would fill every CPU, it becomes background;
when that falls under CALM for two looks, it is a normal box again. Runnable time, not CPU time:
a background box that gets little CPU still wants it, and must not flap back and forth.

Why "fills every CPU" and not "busy": background cgroups do not share fairly among themselves
(each gets the same small weight on every CPU, not one spread over the CPUs by load), so two
busy boxes must both stay normal for fair shares to hold: a box spinning one process next to a
box spinning five got 0.36 of the CPU when both were background, 0.49 as normal boxes. A box that
wants every CPU is what hurts the others; one that wants less keeps its fair share as before.

Only boxes with services have a supervisor, so only they are watched. `[host] background_busy =
false` turns it off (to measure what it does).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable

from worktreebox.system import procfs

WINDOW = 0.5  # seconds between looks
BUSY = 0.9  # runnable threads worth this part of all CPUs: the box would fill the host
CALM = 0.5  # below this part: calm (between the two nothing changes)
LOOKS = 2  # looks in a row before a change


def runnable_ns(pids: Iterable[int]) -> dict[tuple[int, str], int]:
    """Runnable ns of every thread of `pids`, by (pid, tid)."""
    out = {}
    for pid in pids:
        for tid in procfs.thread_ids(pid):
            ns = procfs.runnable_ns(pid, tid)
            if ns is not None:
                out[(pid, tid)] = ns
    return out


class BusyWatch:
    """Makes a box background while it is busy (see the module's doc). `pids()` lists the box's
    processes, `set_background(on)` switches its cgroup."""

    def __init__(self, pids: Callable[[], Iterable[int]], set_background: Callable[[bool], bool],
                 clock: Callable[[], float] = time.monotonic, cpus: int | None = None) -> None:
        self.pids = pids
        self.cpus = cpus or len(os.sched_getaffinity(0))
        self.set_background = set_background
        self.clock = clock
        self.background = False
        self._last: tuple[float, dict[tuple[int, str], int]] | None = None
        self._streak = 0  # looks in a row that point the other way

    def demand(self) -> float | None:
        """Cores' worth of runnable time since the last look (threads seen both times)."""
        now, seen = self.clock(), runnable_ns(self.pids())
        last, self._last = self._last, (now, seen)
        if last is None or now <= last[0]:
            return None
        before = last[1]
        ns = sum(v - before[k] for k, v in seen.items() if k in before)
        return ns / ((now - last[0]) * 1e9)

    def look(self) -> None:
        cores = self.demand()
        if cores is None:
            return
        other_way = cores < CALM * self.cpus if self.background else cores >= BUSY * self.cpus
        self._streak = self._streak + 1 if other_way else 0
        if self._streak >= LOOKS and self.set_background(not self.background):
            self.background = not self.background
            self._streak = 0

    def run(self, stop: Callable[[float], bool]) -> None:
        """Look every WINDOW seconds until `stop(timeout)` (an Event's wait) says to end; the box
        is a normal box again at the end (and at the start: a supervisor killed while its box was
        background left it so)."""
        self.set_background(False)
        try:
            while not stop(WINDOW):
                try:
                    self.look()
                except Exception:
                    pass
        finally:
            if self.background:
                self.set_background(False)
