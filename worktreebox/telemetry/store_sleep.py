"""A quiet box's VictoriaMetrics sleeps (frozen in its cgroup leaf) and wakes when it is needed.

Why: an idle VictoriaMetrics 1.79 wakes ~45 times a second for its own timers (flushers, its
clock, the free-disk-space watch) and so uses 1.0-1.4 milli-CPU whatever its flags (measured on
our 2-core host: -search.disableCache, -fs.disableMmap, small caches, idle connection timeouts
changed nothing): more than the whole budget of an idle box (issue 27: 1 milli-CPU). A frozen
process uses none, keeps its memory and its data, and answers as soon as it is thawed.

It sleeps when the box has been calm (its processes, wtbox's own aside, used less than
background.ACTIVE of a core at every look) for SLEEP_AFTER seconds and nobody read its metrics
for READ_LINGER seconds. It wakes:
- when wtbox reads or writes it: `wake(box)` (a `metrics` query, `probe`, `browse`) thaws it
  and stamps run/metrics.read; the box's own process wakes it before each push (`for_push`);
- when the box is active again (the box process's watch, one look every 4 s at most): an app
  that serves requests gets scraped and may push as before.
While it sleeps nothing is scraped: the box's scrapes back off to one per push of the box
process (background's calm cadence), which is what a box nobody works in needs. An app that
pushes to it while it sleeps waits for the next look (its own CPU makes the box active).
Only the native store sleeps (a container's cgroup is Docker's); a host without a freezer never.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from worktreebox.system import cgroups

if TYPE_CHECKING:
    from worktreebox.box import Box

SLEEP_AFTER = 30.0  # seconds of a calm box before its store sleeps
READ_LINGER = 300.0  # a read keeps the store awake this long: someone is looking at the box
PUSH_LINGER = 1.0  # after a push of the box process: time for the store to take it and scrape once
READ_STAMP = "metrics.read"


def wake(box: Box) -> None:
    """Thaw the box's store, if it sleeps, and say it was read (before a query, a probe's record)."""
    stamp = box.run_dir / READ_STAMP
    try:
        stamp.touch()  # first: a box process that froze it just now sees this and thaws it (StoreSleep.look)
    except OSError:
        pass
    backend = cgroups.for_home(box.dir.parent.parent)
    if backend is not None and backend.asleep(box.id, cgroups.METRICS):
        backend.sleep(box.id, cgroups.METRICS, False)


def sleeps_here(run_dir: Path) -> bool:
    """A native store (its pid file; a container's cgroup is Docker's), and no Vector beside it
    in its leaf (Vector ships logs as they come: it must not sleep)."""
    return (run_dir / "victoria-metrics.pid").exists() and not (run_dir / "vector.pid").exists()


def asleep(box: Box) -> bool:
    backend = cgroups.for_home(box.dir.parent.parent)
    return backend is not None and backend.asleep(box.id, cgroups.METRICS)


class StoreSleep:
    """The box process's side: puts the store to sleep and wakes it (see the module's doc)."""

    def __init__(self, backend: cgroups.Cgroups, box_id: str, run_dir: Path,
                 clock: Callable[[], float] = time.time) -> None:
        self.backend, self.box_id, self.run_dir, self.clock = backend, box_id, run_dir, clock
        self.asleep = backend.asleep(box_id, cgroups.METRICS)  # a killed predecessor may have left it so
        self.awake_until = clock() + SLEEP_AFTER

    def look(self, active: bool) -> None:
        """After each look of the box watch: wake the store of an active box, put a calm one's to sleep."""
        now = self.clock()
        read = self._read_at()
        if active:
            self.awake_until = max(self.awake_until, now + SLEEP_AFTER)
        if read is not None:
            self.awake_until = max(self.awake_until, read + READ_LINGER)
        if self.asleep and (active or now < self.awake_until):
            self._set(False)
        elif not self.asleep and now >= self.awake_until:
            self._set(True)
            if self._read_at() != read:  # read while it was being frozen: the reader's thaw may be lost
                self._set(False)

    def for_push(self) -> None:
        """Before the box process pushes: awake, and for PUSH_LINGER after."""
        self.awake_until = max(self.awake_until, self.clock() + PUSH_LINGER)
        if self.asleep or self.backend.asleep(self.box_id, cgroups.METRICS):
            self._set(False)

    def close(self) -> None:
        """The box process ends: the store is left awake (rm and gc stop it with signals)."""
        if self.asleep:
            self._set(False)

    def _set(self, on: bool) -> None:
        if self.backend.sleep(self.box_id, cgroups.METRICS, on):
            self.asleep = on

    def _read_at(self) -> float | None:
        try:
            return os.stat(self.run_dir / READ_STAMP).st_mtime
        except OSError:
            return None
