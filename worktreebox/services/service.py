"""One supervised service: its process group, readiness, restarts with backoff (the supervisor's "Process").

The test seams live here too: a `Clock` (now, interruptible waits) and a `Processes` factory
(start, stop), injected into the Supervisor so that restart backoff and ready timeouts are
unit-tested without real time (tests/services/test_service.py).
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from worktreebox.services import boxenv
from worktreebox.services.control import BACKOFF, EXITED, FAILED, READY, STARTING, STOPPED, ServiceState
from worktreebox.services.spec import ServiceSpec
from worktreebox.system import cgroups, procs, readiness
from worktreebox.telemetry.logs.writer import LogWriter

BACKOFF_START, BACKOFF_CAP = 0.5, 30.0
STABLE_AFTER = 30.0  # a service that ran this long ready starts its backoff over
# A service that exits this many times in a row without becoming ready has failed to start: waiting out its
# ready_timeout (60 s by default) while it restarts would only repeat its output.
UNREADY_EXITS = 3
NO_CHECK_GRACE = 0.2  # without a ready check, surviving this long counts as ready


class Clock:
    """Wall time and interruptible waits; tests pass one whose waits advance a counter instead."""

    def now(self) -> float:
        return time.time()

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """Wait until `event` is set or `timeout` passes; True when it was set."""
        return event.wait(timeout)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class Process(Protocol):
    """What the supervisor needs of a running service (a Popen in production)."""

    pid: int
    stdout: Any
    stderr: Any

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


class Processes:
    """How service processes are started and stopped: procs.spawn in a new session and in the
    service's leaf of the box's cgroup, through the box's launcher (its sandbox); staged group
    stops, then whatever is left in the leaves."""

    def __init__(self, home: Path | None = None, box_id: str | None = None,
                 launcher: procs.Launcher | None = None) -> None:
        self.home, self.box_id = home, box_id
        self.launcher = launcher or procs.Launcher()

    def start(self, cmd: str, cwd: str, env: dict[str, str], leaf: str | None = None,
              output: tuple[int, int] | None = None) -> Process:
        """`output`: the fds its stdout and stderr write to (output.py), else nowhere."""
        # Own session = own process group, so stopping takes the whole tree the shell started; own
        # cgroup leaf, so a stop also finds what left the group, and the kernel counts its OOM kills.
        where = cgroups.Leaf(self.home, self.box_id, leaf) if leaf and self.home and self.box_id else None
        out, err = output or (subprocess.DEVNULL, subprocess.DEVNULL)
        return procs.spawn(self.launcher.command(procs.shell_argv(cmd), cwd), cwd=cwd, env=env, stdout=out, stderr=err,
                           cgroup=where)

    def stop(self, processes: Sequence[Process], wait: float, leaves: Sequence[str] = ()) -> None:
        procs.stop_groups(processes, wait)  # type: ignore[arg-type]
        if leaves and self.home and self.box_id:
            # Daemons the services started in sessions of their own are still in their leaves.
            procs.stop_cgroup(self.home, self.box_id, list(leaves), wait)


ReadyCheck = Callable[[str, "Service", float], bool]


class Coordinator(Protocol):
    """What a Service needs of its supervisor (supervisor.Supervisor): the box it runs for, the
    seams, its siblings, and where it reports."""

    home: Path
    box_id: str
    box_env: dict[str, str]
    secrets: dict[str, str]
    workdir: str
    logs_dir: Path
    redact: Any
    clock: Clock
    processes: Processes
    check_ready: ReadyCheck
    verify_ports: bool
    output: Any
    services: dict[str, Service]
    stopping: bool

    def event(self, service: str, level: str, msg: str, **extra: Any) -> None: ...

    def changed(self) -> None: ...

    def check_oom(self) -> None: ...


class Service:
    """One service: its process group, readiness, restart policy."""

    def __init__(self, sup: Coordinator, spec: ServiceSpec) -> None:
        self.sup = sup
        self.spec = spec
        self.name = spec.name
        self.restart_policy = spec.restart or "on-failure"
        self.check_saw = ""  # what the last ready check that failed saw (readiness.Strategy.why)
        self.ready_timeout = float(spec.ready_timeout or 60.0)
        self.state = STOPPED
        self.proc: Process | None = None
        self.restarts = 0
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.ready_seconds: float | None = None
        self.exit_code: int | None = None
        self.error: str | None = None
        self.wanted = False
        self.first_start: float | None = None
        self.unready_exits = 0  # exits in a row without becoming ready
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self.writer = LogWriter(sup.logs_dir, self.name, sup.redact)
        self.thread: threading.Thread | None = None

    @property
    def cwd(self) -> str:
        return self.spec.cwd or self.sup.workdir

    def env(self) -> dict[str, str]:
        # WTBOX_SERVICE: how a new supervisor finds what a dead one left running
        return boxenv.compose(self.sup.box_id, self.sup.box_env, self.spec.env, self.sup.secrets,
                              {"WTBOX_SERVICE": self.name})

    # -- control (called from socket threads)
    def up(self) -> None:
        with self._lock:
            if self.wanted and self.thread and self.thread.is_alive():
                return
            self.wanted = True
            self.error = None
            self.first_start = None
            self.unready_exits = 0
            self._wake.clear()
            self.thread = threading.Thread(target=self._run, name=f"svc-{self.name}", daemon=True)
            self.thread.start()

    def down(self) -> None:
        with self._lock:
            self.wanted = False
            self._wake.set()
        self._terminate()
        if self.thread is not None:
            self.thread.join(timeout=procs.kill_wait() + 5)
        self.state = STOPPED
        self.sup.changed()

    def _sleep(self, seconds: float) -> bool:
        """Wait, woken early by a stop; True when woken."""
        return self.sup.clock.wait(self._wake, seconds)

    # -- the life of the service
    def _run(self) -> None:
        clock = self.sup.clock
        backoff = BACKOFF_START
        if not self._wait_for_deps():
            return
        while self.wanted and not self.sup.stopping:
            self.first_start = self.first_start or clock.now()
            try:
                if not self._spawn():
                    break
            except OSError as e:
                self.error = f"cannot start: {e}"
                self.state = FAILED
                self.sup.event(self.name, "error", f"{self.name} could not start: {e}")
                self.sup.changed()
                return
            self._wait_ready()
            code = self._wait_exit()
            # Was it the kernel's OOM killer (of the shell's child: the shell then exits 137)? Say so
            # before the restart; a few file reads.
            self.sup.check_oom()
            if not self.wanted or self.sup.stopping:
                break
            if self.ready_at is not None and clock.now() - self.ready_at >= STABLE_AFTER:
                backoff = BACKOFF_START
            if not self._restarts_after(code):
                self.state = EXITED if code == 0 else FAILED
                if code != 0:
                    self.error = f"exited with code {code}"
                self.sup.changed()
                return
            self._count_unready_exit(code)
            self.state = BACKOFF
            self.restarts += 1
            self.sup.event(self.name, "warning", f"{self.name} restarting in {backoff:g}s (restart {self.restarts})",
                           event="restart", restarts=self.restarts, delay=backoff)
            self.sup.changed()
            if self._sleep(backoff):
                break
            backoff = min(backoff * 2, BACKOFF_CAP)
        if self.state != FAILED:
            self.state = STOPPED
        self.sup.changed()

    def _count_unready_exit(self, code: int) -> None:
        """After UNREADY_EXITS exits in a row before ready the service reports an error with its exit code
        (what `new`/`up` wait for: they fail at once); it is still restarted, and ready clears it."""
        self.unready_exits = 0 if self.ready_at is not None else self.unready_exits + 1
        if self.unready_exits == UNREADY_EXITS and not self.error:
            self.error = f"exited with code {code} before it was ready, {self.unready_exits} times in a row"
            self.sup.event(self.name, "error", f"{self.name} {self.error}", event="unready_exits", code=code)
            self.sup.changed()

    def _restarts_after(self, code: int) -> bool:
        return self.restart_policy == "always" or (self.restart_policy == "on-failure" and code != 0)

    def _wait_for_deps(self) -> bool:
        deps = [self.sup.services[d] for d in self.spec.depends_on if d in self.sup.services]
        while self.wanted and not self.sup.stopping:
            # A one-shot dependency (restart = "no", e.g. a migration) counts once it finished cleanly.
            if all(d.state == READY or (d.state == EXITED and d.exit_code == 0 and d.ready_at) for d in deps):
                return True
            self._sleep(0.05)
        return False

    def _spawn(self) -> bool:
        """Start the process; False when a stop came first (checked under the lock `down` takes)."""
        env = self.env()
        with self._lock:
            if not self.wanted or self.sup.stopping:
                return False
            fds = self.sup.output.files_for(self.name) if self.sup.output is not None else None
            try:
                self.proc = self.sup.processes.start(self.spec.cmd, self.cwd, env, leaf=self.name, output=fds)
            except BaseException:
                if self.sup.output is not None:
                    self.sup.output.started(self.name)
                raise
            finally:
                for fd in fds or ():
                    os.close(fd)
        self.started_at = self.sup.clock.now()
        self.ready_at = None
        self.ready_seconds = None
        self.exit_code = None
        self.state = STARTING
        # The event goes first so that in the merged logs it precedes the service's own output
        # (`new` shows a failed service's lines since its last start event).
        self.sup.event(self.name, "info", f"{self.name} started (pid {self.proc.pid})", event="start",
                       pid=self.proc.pid)
        if self.sup.output is not None:
            self.sup.output.started(self.name)
        self.sup.changed()
        return True

    def _wait_ready(self) -> None:
        """Probe the ready check until it passes or the process ends. Past ready_timeout (from the
        first start: restarts do not buy more time) the service is reported not ready, and probed on."""
        clock = self.sup.clock
        left = (self.first_start or clock.now()) + self.ready_timeout - clock.now()
        # Without a check nothing is probed: one pause until the grace is over.
        poll = (0.02, 0.05) if self.spec.ready else (max(0.005, NO_CHECK_GRACE - self._running_for()),) * 2
        outcome = readiness.wait(self._readiness(), left, alive=self._running, poll=poll[0], poll_max=poll[1],
                                 now=clock.now, sleep=self._sleep, on_timeout=self._report_unready)
        if outcome is not None:
            return
        self.ready_at = clock.now()
        self.ready_seconds = round(self.ready_at - (self.started_at or self.ready_at), 3)
        self.state = READY
        self.error = None
        self.sup.event(self.name, "info", f"{self.name} ready after {self.ready_seconds:.3f}s",
                       event="ready", ready_seconds=self.ready_seconds)
        self.sup.changed()

    def _running_for(self) -> float:
        return self.sup.clock.now() - (self.started_at or self.sup.clock.now())

    def _running(self) -> bool:
        return self.wanted and not self.sup.stopping and self.proc is not None and self.proc.poll() is None

    def _readiness(self) -> readiness.Strategy:
        """What `ready` means for this service: its check answers (without one: it survived
        NO_CHECK_GRACE), and a check on a port is answered by the service itself (honest
        readiness: the port is held by its process tree, or by another service given the same
        port, as Procfile services share $PORT)."""
        check = self.spec.ready
        if not check:
            return readiness.Lived(self.started_at or 0.0, NO_CHECK_GRACE, self.sup.clock.now)
        answered = readiness.Probe(lambda timeout: self.sup.check_ready(check, self, timeout))
        port = self.spec.port
        if not (port and self.spec.holds_port and self.sup.verify_ports and readiness.connects(check)):
            return answered
        return answered & readiness.HoldsPort(port, self._holders_of_port, self._port_taken)

    def _holders_of_port(self) -> list[int]:
        sharing = [s for s in self.sup.services.values() if s.spec.port == self.spec.port]
        return [s.proc.pid for s in sharing if s.proc is not None and s.proc.poll() is None]

    def _port_taken(self, stranger: int) -> None:
        """A stranger answers the check on our port: an error naming it."""
        if not self.error:
            self.error = f"port {self.spec.port} is held by {procs.describe(stranger)}, not by the service"
            self.sup.event(self.name, "error", f"{self.name}: {self.error}", event="port_taken", port=self.spec.port)
            self.sup.changed()

    def _report_unready(self) -> None:
        if not self.error:
            seen = f": {self.check_saw}" if self.check_saw else ""
            self.error = f"not ready after {self.ready_timeout:g}s{seen}"
            self.sup.event(self.name, "error", f"{self.name} {self.error}", event="unready")
            self.sup.changed()

    def _out_of_time(self) -> bool:
        """Not ready within ready_timeout of the first start (restarts do not buy more time)."""
        return self.first_start is not None and self.sup.clock.now() - self.first_start > self.ready_timeout

    def _wait_exit(self) -> int:
        assert self.proc is not None  # called after _start
        code = self.proc.wait()
        if self.sup.output is not None:
            self.sup.output.finish(self.name)  # its last words before its exit event
        self.exit_code = code
        level = "info" if code == 0 or not self.wanted else "error"
        self.sup.event(self.name, level, f"{self.name} exited with code {code}", event="exit", code=code)
        if self.ready_at is None and self._out_of_time() and not self.error:
            self.error = f"not ready after {self.ready_timeout:g}s (exits with code {code})"
        self.state = EXITED
        self.sup.changed()
        return code

    def _terminate(self) -> None:
        """Staged stop of the group and of the service's cgroup leaf; for an exited leader it still
        ends stragglers left in the group, and daemons that left it."""
        self.sup.processes.stop([self.proc] if self.proc is not None else [], procs.kill_wait(), leaves=[self.name])

    def info(self) -> ServiceState:
        pid = self.proc.pid if self.proc is not None and self.proc.poll() is None else None
        return ServiceState(state=self.state, pid=pid, port=self.spec.port,
                            started_at=self.started_at, ready_at=self.ready_at, ready_seconds=self.ready_seconds,
                            restarts=self.restarts, exit_code=self.exit_code, error=self.error,
                            restart=self.restart_policy)


def check_ready(check: str, svc: Service, timeout: float) -> bool:
    """One probe of a service's ready check (readiness.from_spec); a command check runs as a
    process of the box (its launcher), with the service's cwd and environment, in its cgroup leaf."""
    def command(cmd: str) -> readiness.Strategy:
        return readiness.Command(svc.sup.processes.launcher.command(procs.shell_argv(cmd), svc.cwd), cwd=svc.cwd,
                                 env=svc.env(), cgroup=cgroups.Leaf(svc.sup.home, svc.sup.box_id, svc.name))

    strategy = readiness.from_spec(check, command)
    ready = strategy.ready(timeout)
    svc.check_saw = "" if ready else strategy.why
    return ready
