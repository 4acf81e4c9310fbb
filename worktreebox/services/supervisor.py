"""The per-box supervisor: `python -m worktreebox.services.supervisor <home> <box_id>`.

Like honcho, three parts: a `Service` is what runs (one process group, its output
pumped into a LogWriter), the `Supervisor` coordinates (dependency order, readiness,
restarts with backoff, control socket, state file), and `worktreebox.telemetry.logs.writer` writes.

It gets a `SupervisorPayload` (the rendered `ServiceSpec`s and the `--secret` values) on
stdin from the services resource; the secrets live only in memory and in the services'
environment. The box env comes from the box env file. Stopping is staged (procs.stop_groups).
What clients may send and read is `worktreebox.services.control`.

Test seams: a `Clock` (now, interruptible waits) and a `Processes` factory (start, stop)
are injected, so restart backoff and ready timeouts are unit-tested without real time.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from worktreebox import settings
from worktreebox.secrets import Redactor, secret_values
from worktreebox.services import boxenv, control
from worktreebox.services.control import (
    BACKOFF,
    EXITED,
    FAILED,
    READY,
    STARTING,
    STOPPED,
    Request,
    Response,
    ServiceState,
)
from worktreebox.services.envfile import read_env_file
from worktreebox.services.spec import ServiceSpec, SupervisorPayload
from worktreebox.system import background, cgroups, procs
from worktreebox.telemetry.logs.writer import EventLog, LogWriter, pump

BACKOFF_START, BACKOFF_CAP = 0.5, 30.0
STABLE_AFTER = 30.0  # a service that ran this long ready starts its backoff over
NO_CHECK_GRACE = 0.2  # without a ready check, surviving this long counts as ready
COLLECT_EVERY = 5.0


def background_wanted(home: Path) -> bool:
    """`[host] background_busy` (default true); a config that cannot be read leaves it on (the
    commands that read it say what is wrong)."""
    from worktreebox.config.load import ConfigError, load_host_config

    try:
        return load_host_config(home).background_busy
    except ConfigError:
        return True


def kill_wait() -> float:
    """SIGTERM → SIGKILL grace (tests shorten it), read when used: a value read at import would be
    the first caller's in a process that serves many (cliserver.py)."""
    return settings.KILL_WAIT.seconds()


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
    service's leaf of the box's cgroup; staged group stops, then whatever is left in the leaves."""

    def __init__(self, home: Path | None = None, box_id: str | None = None) -> None:
        self.home, self.box_id = home, box_id

    def start(self, cmd: str, cwd: str, env: dict[str, str], leaf: str | None = None) -> Process:
        # Own session = own process group, so stopping takes the whole tree the shell started; own
        # cgroup leaf, so a stop also finds what left the group, and the kernel counts its OOM kills.
        where = cgroups.Leaf(self.home, self.box_id, leaf) if leaf and self.home and self.box_id else None
        return procs.spawn(procs.shell_argv(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           cgroup=where)

    def stop(self, processes: Sequence[Process], wait: float, leaves: Sequence[str] = ()) -> None:
        procs.stop_groups(processes, wait)  # type: ignore[arg-type]
        if leaves and self.home and self.box_id:
            # Daemons the services started in sessions of their own are still in their leaves.
            procs.stop_cgroup(self.home, self.box_id, list(leaves), wait)


ReadyCheck = Callable[[str, "Service", float], bool]


class Service:
    """One service: its process group, readiness, restart policy."""

    def __init__(self, sup: Supervisor, spec: ServiceSpec) -> None:
        self.sup = sup
        self.spec = spec
        self.name = spec.name
        self.restart_policy = spec.restart or "on-failure"
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
            self._wake.clear()
            self.thread = threading.Thread(target=self._run, name=f"svc-{self.name}", daemon=True)
            self.thread.start()

    def down(self) -> None:
        with self._lock:
            self.wanted = False
            self._wake.set()
        self._terminate()
        if self.thread is not None:
            self.thread.join(timeout=kill_wait() + 5)
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
            self.proc = self.sup.processes.start(self.spec.cmd, self.cwd, env, leaf=self.name)
        self.started_at = self.sup.clock.now()
        self.ready_at = None
        self.ready_seconds = None
        self.exit_code = None
        self.state = STARTING
        # The event goes first so that in the merged logs it precedes the service's own output.
        self.sup.event(self.name, "info", f"{self.name} started (pid {self.proc.pid})", event="start",
                       pid=self.proc.pid)
        if self.sup.keeper is not None and self.proc.stdout is not None:
            # The pipes go to the output keeper (a process of its own): a dead supervisor must not
            # leave the service writing into a pipe nobody reads.
            self.sup.keeper.take(self.name, self.proc.stdout, self.proc.stderr)
            self.sup.changed()
            return True
        for pipe, stream in ((self.proc.stdout, "stdout"), (self.proc.stderr, "stderr")):
            if pipe is None:
                continue
            fd = os.dup(pipe.fileno())
            pipe.close()
            threading.Thread(target=pump, args=(fd, stream, self.writer), daemon=True,
                             name=f"pump-{self.name}-{stream}").start()
        self.sup.changed()
        return True

    def _wait_ready(self) -> None:
        """Poll the readiness check until it passes, the process exits, or ready_timeout passes."""
        clock = self.sup.clock
        check = self.spec.ready
        delay = 0.02
        while self.wanted and not self.sup.stopping and self.proc.poll() is None:
            elapsed = clock.now() - self.started_at
            ok = self.sup.check_ready(check, self, min(2.0, max(0.2, self.ready_timeout - elapsed))) if check \
                else elapsed >= NO_CHECK_GRACE
            if ok and not self._holds_port():
                ok = False  # the check was answered, but not by this service (see _holds_port)
            if ok and self.proc.poll() is None:
                self.ready_at = clock.now()
                self.ready_seconds = round(self.ready_at - self.started_at, 3)
                self.state = READY
                self.error = None
                self.sup.event(self.name, "info", f"{self.name} ready after {self.ready_seconds:.3f}s",
                               event="ready", ready_seconds=self.ready_seconds)
                self.sup.changed()
                return
            if self._out_of_time() and not self.error:
                self.error = f"not ready after {self.ready_timeout:g}s"
                self.sup.event(self.name, "error", f"{self.name} {self.error}", event="unready")
                self.sup.changed()
            self._sleep(delay if check else max(0.005, NO_CHECK_GRACE - elapsed))
            delay = min(delay * 1.5, 0.05)

    def _holds_port(self) -> bool:
        """Honest readiness: when the ready check connects to the service's port, that port must
        be held by the service's own process tree (or by another service given the same port, as
        Procfile services share $PORT). A stranger that answers the check is an error naming it."""
        port = self.spec.port
        # Only a check that connects to a port can be answered by a stranger on it.
        if not port or not self.spec.holds_port or not self.sup.verify_ports \
                or not str(self.spec.ready or "").startswith(("tcp:", "http://", "https://")):
            return True
        sharing = [s for s in self.sup.services.values() if s.spec.port == port]

        def ours() -> bool:
            return any(s.proc is not None and s.proc.poll() is None and procs.tree_listens_on(s.proc.pid, port)
                       for s in sharing)

        if ours():
            return True
        # A listener with no visible pid (0) may be the service's socket made a moment ago, while
        # the system-wide scan ran: only a named stranger, still there after a second look, counts.
        roots = {s.proc.pid for s in sharing if s.proc is not None}
        strangers = [p for p in procs.listeners(port) if p and p not in roots]
        if strangers and ours():
            return True
        if strangers and not self.error:
            self.error = f"port {port} is held by {procs.describe(strangers[0])}, not by the service"
            self.sup.event(self.name, "error", f"{self.name}: {self.error}", event="port_taken", port=port)
            self.sup.changed()
        return False

    def _out_of_time(self) -> bool:
        """Not ready within ready_timeout of the first start (restarts do not buy more time)."""
        return bool(self.first_start) and self.sup.clock.now() - self.first_start > self.ready_timeout

    def _wait_exit(self) -> int:
        code = self.proc.wait()
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
        self.sup.processes.stop([self.proc] if self.proc is not None else [], kill_wait(), leaves=[self.name])

    def info(self) -> ServiceState:
        alive = self.proc is not None and self.proc.poll() is None
        return ServiceState(state=self.state, pid=self.proc.pid if alive else None, port=self.spec.port,
                            started_at=self.started_at, ready_at=self.ready_at, ready_seconds=self.ready_seconds,
                            restarts=self.restarts, exit_code=self.exit_code, error=self.error,
                            restart=self.restart_policy)


def check_ready(check: str, svc: Service, timeout: float) -> bool:
    """http(s):// answers < 500; tcp:PORT or tcp:HOST:PORT accepts; otherwise a shell command exits 0."""
    if check.startswith("http://"):
        return _http_ok(check, timeout)
    if check.startswith("https://"):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(check, timeout=timeout) as r:
                return r.status < 500
        except urllib.error.HTTPError as e:
            return e.code < 500
        except (OSError, ValueError):
            return False
    if check.startswith("tcp:"):
        host, _, port = check[4:].rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
                return True
        except (OSError, ValueError):
            return False
    try:
        proc = procs.spawn(procs.shell_argv(check), cwd=svc.cwd, env=svc.env(),
                           cgroup=cgroups.Leaf(svc.sup.home, svc.sup.box_id, svc.name))
    except OSError:
        return False
    try:
        return proc.wait(timeout=timeout) == 0
    except subprocess.TimeoutExpired:
        procs.signal_group(proc.pid, signal.SIGKILL)  # a check has nothing to clean up
        proc.wait()
        return False


def _http_ok(url: str, timeout: float) -> bool:
    """GET over a plain socket: urllib costs ~90 ms to import and ~8 MB of the supervisor's memory."""
    from urllib.parse import urlsplit

    try:
        u = urlsplit(url)
        host, port = u.hostname or "127.0.0.1", u.port or 80
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: {u.netloc}\r\nUser-Agent: wtbox\r\n\r\n".encode())
            head = b""
            while b"\r\n" not in head and len(head) < 4096:
                chunk = s.recv(4096)
                if not chunk:
                    break
                head += chunk
        parts = head.split(b"\r\n", 1)[0].split()
        return len(parts) >= 2 and parts[0].startswith(b"HTTP/") and int(parts[1]) < 500
    except (OSError, ValueError):
        return False


class Supervisor:
    def __init__(self, home: Path, box_id: str, payload: SupervisorPayload, *, clock: Clock | None = None,
                 processes: Processes | None = None, check: ReadyCheck | None = None) -> None:
        self.home = home
        self.box_id = box_id
        self.box_dir = home / "boxes" / box_id
        self.run_dir = self.box_dir / "run"
        self.logs_dir = self.box_dir / "logs"
        self.clock = clock or Clock()
        self.processes = processes or Processes(home, box_id)
        self.check_ready: ReadyCheck = check or check_ready
        # Real processes only: port ownership is asked of the kernel (fakes in tests hold no ports).
        self.verify_ports = processes is None
        self.keeper: OutputKeeper | None = None  # made by run(), before any thread
        self.secrets = dict(payload.secrets)
        self.workdir = payload.workdir or str(self.box_dir / "worktree")
        self.box_env = read_env_file(self.box_dir / "env")
        self.metrics_url = self.box_env.get("WTBOX_METRICS_URL")
        self.redact = Redactor(list(self.secrets.values()) + secret_values(self.box_env))
        self.stopping = False
        self.events = EventLog(self.logs_dir)
        self.services: dict[str, Service] = {s.name: Service(self, s) for s in payload.services}
        self._state_lock = threading.Lock()
        self._dirty = threading.Event()
        self._done = threading.Event()
        self.started_at = self.clock.now()
        self.oom = cgroups.OomWatch(home, box_id)
        self._collect_lock = threading.Lock()
        self._busy_watch: threading.Thread | None = None

    def event(self, service: str, level: str, msg: str, **extra: Any) -> None:
        try:
            self.events(service, level, self.redact(msg), **extra)
        except OSError:
            pass

    def changed(self) -> None:
        self._dirty.set()

    def check_oom(self) -> None:
        """Record each OOM kill in the box as an error event naming the process (the service is
        restarted as for any crash), and push the counters at once."""
        kills = self.oom.new_kills()
        if not kills:
            return
        limit = self.oom.memory_max()
        why = f"the box reached its memory limit (memory_max {_size(limit)})" if limit else "out of memory"
        for k in kills:
            who = f"process {k['pid']} ({k['task']})" if k["pid"] else "a process"
            self.event(k["leaf"], "error", f"{k['leaf']}: the kernel killed {who}: {why}", event="oom",
                       pid=k["pid"], task=k["task"], memory_max=limit)
        self.collect()

    def state(self) -> control.SupervisorState:
        return control.SupervisorState(box_id=self.box_id, pid=os.getpid(), started_at=self.started_at,
                                       stopping=self.stopping, updated_at=self.clock.now(),
                                       services={n: s.info() for n, s in self.services.items()})

    def write_state(self) -> None:
        with self._state_lock:  # the main loop and control threads both write it
            control.write_state(self.run_dir, self.state())

    # -- control
    def select(self, name: str | None) -> list[Service]:
        if not name:
            return list(self.services.values())
        if name not in self.services:
            raise KeyError(name)
        return [self.services[name]]

    def up(self, name: str | None = None, wait: bool = True) -> None:
        targets = self.select(name)
        for s in targets:
            s.up()
        if wait:
            deadline = self.clock.now() + max([s.ready_timeout for s in targets] or [0]) * max(1, len(targets)) + 1
            while self.clock.now() < deadline and not self.stopping:
                if all(s.state == READY or s.error or s.state in (FAILED, EXITED) for s in targets):
                    break
                self.clock.sleep(0.05)

    def down(self, name: str | None = None) -> None:
        # Reverse dependency order: dependents stop before what they depend on.
        for s in reversed(self.select(name)):
            s.down()

    def stop_all(self) -> None:
        self.stopping = True
        self.changed()
        for s in reversed(list(self.services.values())):
            with s._lock:  # after this no service spawns again (see Service._spawn)
                s.wanted = False
                s._wake.set()
        # All groups (and the services' cgroup leaves) at once: stopping N services costs one KILL_WAIT, not N.
        self.processes.stop([s.proc for s in self.services.values() if s.proc is not None], kill_wait(),
                            leaves=list(self.services))
        for s in self.services.values():
            if s.thread is not None:
                s.thread.join(timeout=2)
            s.state = STOPPED
            s.writer.close()
        if self.keeper is not None:
            self.keeper.close()

    def handle(self, req: Request) -> Response:
        try:
            if req.cmd == control.STATUS:
                pass
            elif req.cmd == control.UP:
                self.up(req.service)
            elif req.cmd == control.DOWN:
                self.down(req.service)
            elif req.cmd == control.RESTART:
                self.down(req.service)
                self.up(req.service)
            elif req.cmd == control.ENV_SECRETS:
                return Response(ok=True, secrets=dict(self.secrets))
            elif req.cmd == control.STOP:
                self.stop_all()  # the reply is sent before the process exits (see _serve_one)
            else:
                return Response(ok=False, error=f"unknown command {req.cmd!r}")
        except KeyError:
            return Response(ok=False, error=f"the box has no service {req.service!r}; it has: {', '.join(self.services)}")
        self.write_state()
        return Response(ok=True, services={n: s.info() for n, s in self.services.items()})

    def serve(self) -> None:
        # A relative path after chdir: the absolute one can exceed the 107-byte sun_path limit.
        os.chdir(self.run_dir)
        try:
            os.unlink(control.SOCKET)
        except FileNotFoundError:
            pass
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            srv.bind(control.SOCKET)
        finally:
            os.umask(old)
        srv.listen(16)
        threading.Thread(target=self._accept, args=(srv,), daemon=True, name="control").start()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve_one, args=(conn,), daemon=True).start()

    def _serve_one(self, conn: socket.socket) -> None:
        req = None
        with conn:
            try:
                pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
                if uid != os.getuid():
                    control.write_message(conn, Response(ok=False, error="permission denied"))
                    return
                conn.settimeout(10)
                data = control.read_line(conn)
                conn.settimeout(None)
                req = Request.from_json(json.loads(data or b"{}"))
                control.write_message(conn, self.handle(req))
            except (OSError, ValueError):
                pass
            finally:
                if req is not None and req.cmd == control.STOP:
                    self.finish()

    def finish(self) -> None:
        """Let the main loop end now (it may be sleeping in its 1 s wait)."""
        self._done.set()
        self._dirty.set()

    def collect(self) -> None:
        if not self.metrics_url:
            return
        try:
            with self._collect_lock:  # the main loop's tick and an OOM report may come at once
                if not hasattr(self, "_collector"):
                    from worktreebox.telemetry.collector import Collector  # only boxes with metrics pay for its imports

                    self._collector = Collector(self.box_id, self.metrics_url, self.logs_dir, home=self.home)
                self._collector.tick([
                    {"name": s.name, "pids": [s.proc.pid] if s.proc and s.proc.poll() is None else [],
                     "up": s.state == READY, "ready_seconds": s.ready_seconds, "restarts": s.restarts}
                    for s in self.services.values()
                ])
        except Exception:
            pass

    def _watch_busy(self) -> None:
        """While the box keeps the CPU busy it runs as a background box (background.py: why)."""
        backend = cgroups.for_home(self.home) if self.verify_ports else None
        if backend is None or not background_wanted(self.home):
            return
        watch = background.BusyWatch(lambda: backend.cpu_pids(self.box_id),
                                     lambda on: backend.set_background(self.box_id, on))
        self._busy_watch = threading.Thread(target=watch.run, args=(self._done.wait,), name="busy", daemon=True)
        self._busy_watch.start()

    def run(self) -> None:
        self.keeper = OutputKeeper(self.logs_dir, self.redact)  # forked before any thread starts
        self.serve()
        self.write_state()
        self._watch_busy()
        for s in self.services.values():
            s.up()
        next_collect = self.clock.now() + 1.0
        while not self._done.is_set():
            if self.clock.wait(self._dirty, 1.0):
                self._dirty.clear()
                self.write_state()
            if self.clock.now() >= next_collect:
                next_collect = self.clock.now() + COLLECT_EVERY
                self.check_oom()  # kills of processes that were not a service's main process
                self.collect()
        if self._busy_watch is not None:
            self._busy_watch.join(2.0)  # it makes the box a normal box again as it ends
        self.write_state()


class OutputKeeper:
    """A child process that owns the services' output pipes and writes them to the logs.

    Forked from the supervisor before it starts any thread. Each started service's stdout and
    stderr are handed over a SOCK_SEQPACKET socket (SCM_RIGHTS) and read there, one thread per
    pipe, into logs/<service>.jsonl. When the supervisor dies (kill -9) the keeper goes on
    reading until the services close their pipes, so a service never blocks on a full pipe or
    dies of SIGPIPE for want of a supervisor; it exits once its supervisor is gone and every
    pipe has ended.
    """

    def __init__(self, logs_dir: Path, redact: Any) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # the keeper
            parent.close()
            code = 0
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                _keep(child, logs_dir, redact)
            except BaseException:
                code = 1
            os._exit(code)
        child.close()
        self.pid, self.sock = pid, parent
        self._lock = threading.Lock()

    def take(self, service: str, *pipes: Any) -> None:
        """Hand a service's pipes to the keeper and close them here."""
        pipes = tuple(p for p in pipes if p is not None)
        with self._lock:
            try:
                socket.send_fds(self.sock, [json.dumps({"service": service}).encode()], [p.fileno() for p in pipes])
            except OSError:
                pass  # the keeper is gone: the pipes close below and the service sees EOF/EPIPE
        for p in pipes:
            p.close()

    def close(self, wait: float = 3.0) -> None:
        """No more pipes: the keeper drains what it has and exits (waited for, so the logs are whole)."""
        with self._lock:
            try:
                self.sock.close()
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:
                return
            time.sleep(0.01)


def _keep(sock: socket.socket, logs_dir: Path, redact: Any) -> None:
    writers: dict[str, LogWriter] = {}
    threads: list[threading.Thread] = []
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 4096, 4)
        except OSError:
            break
        if not msg:
            break  # the supervisor closed its end, or died
        service = json.loads(msg).get("service", "service")
        writer = writers.get(service) or writers.setdefault(service, LogWriter(logs_dir, service, redact))
        for fd, stream in zip(fds, ("stdout", "stderr")):
            t = threading.Thread(target=pump, args=(fd, stream, writer), daemon=True, name=f"pump-{service}-{stream}")
            t.start()
            threads.append(t)
    for t in threads:
        t.join()
    for w in writers.values():
        w.close()


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} bytes"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    home, box_id = Path(argv[0]), argv[1]
    # The payload (with the secrets) comes on stdin (a pipe from the resource), never through argv, env or a file.
    raw = sys.stdin.buffer.read() if not sys.stdin.isatty() else b""
    payload = SupervisorPayload.from_json(json.loads(raw) if raw.strip() else {})
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    # Fork once more so the supervisor is nobody's child: the caller reaps the short-lived
    # parent at once and no zombie waits for a parent that never calls wait().
    if os.fork() > 0:
        os._exit(0)
    run_dir = home / "boxes" / box_id / "run"
    pid_file = run_dir / "supervisor.pid"
    sup = None
    try:
        sup = Supervisor(home, box_id, payload)
        pid_file.write_text(f"{os.getpid()}\n")

        def on_term(signum: int, frame: Any) -> None:
            threading.Thread(target=lambda: (sup.stop_all(), sup.finish()), daemon=True).start()

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        sup.run()
    except Exception:
        import traceback

        msg = traceback.format_exc()
        try:
            EventLog(home / "boxes" / box_id / "logs")("_supervisor", "critical",
                                                        Redactor(list(payload.secrets.values()))(msg))
        except OSError:
            pass
        if sup is not None:
            sup.stop_all()
    finally:
        for p in (pid_file, run_dir / control.SOCKET):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        if sup is not None:
            try:
                sup.write_state()
            except OSError:
                pass
        os._exit(0)


if __name__ == "__main__":
    main()
