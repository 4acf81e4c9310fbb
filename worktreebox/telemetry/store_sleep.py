"""A quiet box's VictoriaMetrics sleeps (its process stopped) and is started again when it is needed.

Why: an idle VictoriaMetrics 1.79 wakes ~45 times a second for its own timers (flushers, its
clock, the free-disk-space watch) and so uses 1.0-1.4 milli-CPU whatever its flags (measured on
our 2-core host: -search.disableCache, -fs.disableMmap, small caches, idle connection timeouts
changed nothing): more than the whole budget of an idle box (issue 27: 1 milli-CPU). And it keeps
18.6 MB of RSS (6.1 MB PSS), 12 MB of it its binary's code, whatever it does. A stopped store costs
neither; its data is on disk (a SIGTERM flushes what it holds in memory), and it starts again in
~20 ms (scripts/bench_scale.py; freezing it in its cgroup, what this did before, saved the CPU
but none of the memory).

It sleeps when the box has been calm (its processes, wtbox's own aside, used less than
background.ACTIVE of a core at every look) for SLEEP_AFTER seconds and nobody read its metrics
for READ_LINGER seconds. Sleeping is a marker file (run/metrics.asleep, so `status`, `gc` and
a new supervisor know a missing process is meant) and the process stopped. It is started again:
- when wtbox reads or writes it (a `metrics` query, `probe`, `browse`: resources/metrics.wake,
  through the box's supervisor, which runs in the box's network) and before the supervisor's
  own pushes (`for_push`);
- when the box is active again (the supervisor's watch, one look every 4 s at most): an app
  that serves requests gets scraped and may push as before.
While it sleeps nothing is scraped and its port is closed: an app that pushes to it then is
refused until the next look wakes it (its own CPU makes the box active).

The start again repeats the first start: `record` keeps the store's command line (its own
flags, no launcher) and the variables wtbox gave it (no secret: ids and GOMAXPROCS)
in run/; the supervisor runs it from inside the box's network as it is, the one other waker
(an unsandboxed box without a supervisor) from the host's. Only the native store sleeps (a
container's lifecycle is Docker's).
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from worktreebox.errors import WtboxError
from worktreebox.system import cgroups, procfs, procs, readiness
from worktreebox.system.fsutil import atomic_write, file_lock

if TYPE_CHECKING:
    from worktreebox.box import Box

SLEEP_AFTER = 30.0  # seconds of a calm box before its store sleeps
READ_LINGER = 300.0  # a read keeps the store awake this long: someone is looking at the box
PUSH_LINGER = 1.0  # after a push of the box process: time for the store to take it and scrape once
READ_STAMP = "metrics.read"
ASLEEP = "metrics.asleep"  # under run/: the store was stopped on purpose
RECIPE = "metrics.start.json"  # under run/: how to start it again
LOCK = "metrics.lock"  # under run/: one sleeper or waker at a time (the supervisor's threads, a CLI)
WAKE_TIMEOUT = 15.0


def record(run_dir: Path, argv: list[str], *, env: dict[str, str], port: int, pid_file: str,
           log_file: str, names: tuple[str, ...]) -> None:
    """Keep how the store was started (the store's own command, without a launcher; `port`: where
    it listens in its network; `env`: what wtbox added to its environment)."""
    atomic_write(run_dir / RECIPE, json.dumps({"argv": argv, "env": env, "port": port,
                                                "pid_file": pid_file, "log_file": log_file, "names": list(names)}))


def sleeps_here(run_dir: Path) -> bool:
    """A native store started with a recipe, and no Vector beside it (Vector ships logs as they
    come: it must not sleep)."""
    return (run_dir / RECIPE).exists() and not (run_dir / "vector.pid").exists()


def asleep(run_dir: Path) -> bool:
    return (run_dir / ASLEEP).exists()


def stamp_read(run_dir: Path) -> None:
    """Say the store was read: the supervisor keeps it awake READ_LINGER from now."""
    try:
        (run_dir / READ_STAMP).touch()
    except OSError:
        pass


class Store:
    """A box's sleeping-capable store process: `sleep` stops it, `wake` starts it again from its recipe."""

    def __init__(self, home: Path, box_id: str, run_dir: Path) -> None:
        self.home, self.box_id, self.run_dir = home, box_id, run_dir

    def asleep(self) -> bool:
        return asleep(self.run_dir)

    def sleep(self) -> None:
        """Stop the store (a SIGTERM: it flushes), the marker first: whoever sees no process then knows why."""
        with file_lock(self.run_dir / LOCK, what="the metrics store's sleep"):
            recipe = self._recipe()
            if recipe is None or self.asleep():
                return
            (self.run_dir / ASLEEP).touch()
            self._stop(recipe)

    def wake(self, url: str | None = None) -> None:
        """Start the store again if it sleeps, where the caller runs (the supervisor: in the box's
        network; the host, for an unsandboxed box), and wait until it answers (at `url`, default its
        own port)."""
        with file_lock(self.run_dir / LOCK, what="the metrics store's sleep"):
            recipe = self._recipe()
            if recipe is None or not self.asleep():
                return
            log = self.run_dir / recipe["log_file"]
            pid = self._running(recipe)  # a waker or sleeper killed half-way left it running
            if pid is None:
                env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **recipe["env"]}
                pid = procs.spawn_detached(recipe["argv"], env=env, log_path=log,
                                           cgroup=cgroups.Leaf(self.home, self.box_id, cgroups.METRICS))
                (self.run_dir / recipe["pid_file"]).write_text(f"{pid}\n")
            health = f"{url or 'http://127.0.0.1:' + str(recipe['port'])}/health"
            why = readiness.wait(readiness.HttpUrl(health, status=200), WAKE_TIMEOUT,
                                 alive=readiness.process_alive(pid))
            if why is not None:
                said = procs.last_line(log, tidy=lambda line: line.rsplit("\t", 1)[-1])
                raise WtboxError(f"The metrics store of box {self.box_id} did not start again ({why}: {said}).")
            (self.run_dir / ASLEEP).unlink(missing_ok=True)

    def _running(self, recipe: dict) -> int | None:
        """The store its pid file names, if that is still ours, read from /proc: the supervisor does
        this, and psutil would add 1.8 MB to each idle one (measured: 100 boxes, bench_scale)."""
        try:
            pid = int((self.run_dir / recipe["pid_file"]).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        argv = procfs.cmdline(pid)
        ours = bool(argv) and os.path.basename(argv[0]) in recipe["names"] \
            and procfs.environ_value(procfs.environ(pid) or b"", "WTBOX_ID") == self.box_id
        return pid if ours else None

    def _stop(self, recipe: dict) -> None:
        """A staged stop of the store; one its pid file lost is found as rm finds it."""
        pid = self._running(recipe)
        if pid is not None:
            procs.stop_pid(pid)
            (self.run_dir / recipe["pid_file"]).unlink(missing_ok=True)
        else:
            procs.stop_named(self.box_id, run_dir=self.run_dir, names=recipe["names"], pid_files=[recipe["pid_file"]])

    def _recipe(self) -> dict | None:
        try:
            return json.loads((self.run_dir / RECIPE).read_text())
        except (OSError, ValueError):
            return None


class StoreSleep:
    """The supervisor's side: puts the store to sleep and wakes it (see the module's doc). The
    marker is the truth: a waker from outside may have started the store meanwhile."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time,
                 report: Callable[[str], None] = lambda msg: None) -> None:
        self.store, self.clock, self.report = store, clock, report
        self.sleep_not_before = clock() + SLEEP_AFTER  # a new box's store stays awake a while...
        self.awake_until = 0.0  # ...but only activity, reads and pushes wake a sleeping one

    @classmethod
    def of(cls, home: Path, box_id: str, run_dir: Path, report: Callable[[str], None]) -> StoreSleep | None:
        """The sleep of a box's store, None when it cannot sleep (see sleeps_here)."""
        return cls(Store(home, box_id, run_dir), report=report) if sleeps_here(run_dir) else None

    @property
    def asleep(self) -> bool:
        return self.store.asleep()

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
        elif not self.asleep and now >= max(self.awake_until, self.sleep_not_before):
            self._set(True)
            if self._read_at() != read:  # read while it was being stopped: that reader waits for us
                self._set(False)

    def for_push(self) -> None:
        """Before the box process pushes: awake, and for PUSH_LINGER after."""
        self.awake_until = max(self.awake_until, self.clock() + PUSH_LINGER)
        if self.asleep:
            self._set(False)

    def _set(self, on: bool) -> None:
        try:
            self.store.sleep() if on else self.store.wake()
        except WtboxError as e:
            self.report(str(e))

    def _read_at(self) -> float | None:
        try:
            return os.stat(self.store.run_dir / READ_STAMP).st_mtime
        except OSError:
            return None


def box_store(box: Box) -> Store:
    return Store(box.dir.parent.parent, box.id, box.run_dir)
