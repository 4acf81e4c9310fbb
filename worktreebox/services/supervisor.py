"""The per-box supervisor: `python -m worktreebox.services.supervisor <home> <box_id>`.

Like honcho, three parts: a `Service` is what runs (service.py: one process group, readiness,
restarts with backoff), the `Supervisor` coordinates (dependency order, the control socket, the
state file, OOM reports, the box's own metrics), and an `OutputKeeper` (keeper.py) writes the
services' output to the logs.

It gets a `SupervisorPayload` (the rendered `ServiceSpec`s and the `--secret` values) on
stdin from the services resource; the secrets live only in memory and in the services'
environment. The box env comes from the box env file. Stopping is staged (procs.stop_groups).
What clients may send and read is `worktreebox.services.control`.

In a sandboxed box it runs in the box's network namespace (only), started by the sandbox resource
before the box's services are known: it hosts the box's forwards (boxnet.py) from the start, gets
its services later (`services` request), and starts each of them through the box's launcher.

Test seams: a `Clock` and a `Processes` factory (service.py) are injected, so restart backoff
and ready timeouts are unit-tested without real time.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from worktreebox.secrets import Redactor, secret_values
from worktreebox.services import control
from worktreebox.services.boxnet import BoxNet, enter_network
from worktreebox.services.control import EXITED, FAILED, READY, STOPPED, Request, Response
from worktreebox.services.envfile import read_env_file
from worktreebox.services.keeper import OutputKeeper
from worktreebox.services.service import (
    BACKOFF_CAP,
    BACKOFF_START,
    NO_CHECK_GRACE,
    STABLE_AFTER,
    Clock,
    Processes,
    ReadyCheck,
    Service,
    check_ready,
)
from worktreebox.services.spec import ForwardSpec, SupervisorPayload
from worktreebox.system import background, cgroups, procs
from worktreebox.telemetry.logs.writer import EventLog

__all__ = ["BACKOFF_CAP", "BACKOFF_START", "NO_CHECK_GRACE", "STABLE_AFTER", "Clock", "Processes", "Service",
           "Supervisor", "main"]

COLLECT_EVERY = 5.0


def background_wanted(home: Path) -> bool:
    """`[host] background_busy` (default true); a config that cannot be read leaves it on (the
    commands that read it say what is wrong)."""
    from worktreebox.config.load import ConfigError, load_host_config

    try:
        return load_host_config(home).background_busy
    except ConfigError:
        return True


class Supervisor:
    """Coordinates a box's services: starts them in dependency order, answers the control socket,
    keeps the state file, reports OOM kills and pushes the box's own metrics."""

    def __init__(self, home: Path, box_id: str, payload: SupervisorPayload, *, clock: Clock | None = None,
                 processes: Processes | None = None, check: ReadyCheck | None = None) -> None:
        self.home = home
        self.box_id = box_id
        self.box_dir = home / "boxes" / box_id
        self.run_dir = self.box_dir / "run"
        self.logs_dir = self.box_dir / "logs"
        self.clock = clock or Clock()
        self.processes = processes or Processes(home, box_id, procs.Launcher.from_json(payload.launcher))
        self.net = BoxNet(payload.forwards, payload.faults) if payload.forwards else None
        self.host_netns_fd = payload.host_netns_fd  # the host's network: where `wtbox` run for the box works
        self.check_ready: ReadyCheck = check or check_ready
        # Real processes only: port ownership is asked of the kernel (fakes in tests hold no ports).
        self.verify_ports = processes is None
        self.keeper: OutputKeeper | None = None  # made by run(), before any thread
        self.secrets = dict(payload.secrets)
        self.workdir = payload.workdir or str(self.box_dir / "worktree")
        self._read_box_env()
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
        self.disk_max = payload.disk_max

    def _read_box_env(self) -> None:
        self.box_env = read_env_file(self.box_dir / "env")
        self.metrics_url = self.box_env.get("WTBOX_METRICS_URL")
        self.redact = Redactor(list(self.secrets.values()) + secret_values(self.box_env))

    def take_services(self, payload: SupervisorPayload) -> None:
        """A sandboxed box's services, once its env is written (`services` request): they start now."""
        if any(s.wanted for s in self.services.values()):
            raise ValueError("the box's services are running; stop them first")
        self.secrets.update(payload.secrets)
        self.workdir = payload.workdir or self.workdir
        self._read_box_env()
        if self.keeper is not None:
            self.keeper.redact_with(list(self.secrets.values()) + secret_values(self.box_env))
        for s in self.services.values():
            s.writer.close()
        self.services = {s.name: Service(self, s) for s in payload.services}
        for s in self.services.values():
            s.up()

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
                                       services={n: s.info() for n, s in self.services.items()},
                                       forwards=self.net.report() if self.net is not None else {})

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
        self.processes.stop([s.proc for s in self.services.values() if s.proc is not None], procs.kill_wait(),
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
                self.stop_all()  # the reply is sent before the process exits (see _after)
            elif req.cmd in (control.SERVICES, control.NET, control.FORWARD, control.UNFORWARD):
                self.handle_box(req)
            else:
                return Response(ok=False, error=f"unknown command {req.cmd!r}")
        except KeyError:
            known = ", ".join(self.services)
            return Response(ok=False, error=f"the box has no service {req.service!r}; it has: {known}")
        except (ValueError, OSError) as e:  # UsageError is a ValueError too: a refusal in one sentence
            return Response(ok=False, error=str(e).rstrip("."))
        self.write_state()
        return Response(ok=True, services={n: s.info() for n, s in self.services.items()})

    def handle_box(self, req: Request) -> None:
        """The requests of a sandboxed box's supervisor: its services, its forwards and their faults."""
        data = req.data or {}
        if req.cmd == control.SERVICES:
            self.take_services(SupervisorPayload.from_json(data))
            return
        if self.net is None:
            self.net = BoxNet([])
        if req.cmd == control.NET:
            self.net.set_faults(req.service, data)
        elif req.cmd == control.FORWARD:
            fd = os.dup(req.fds[0]) if req.fds else None
            self.net.add(ForwardSpec.from_json(data), fd)
        else:
            self.net.remove(str(data.get("name")))

    def serve(self) -> None:
        os.chdir(self.run_dir)  # the supervisor's cwd lies in its box: sweeps by cwd find it too
        control.serve(self.run_dir, self.handle, self._after)

    def _after(self, req: Request) -> None:
        if req.cmd == control.STOP:
            self.finish()  # after the answer was sent (see handle)

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

    def _watch_disk(self) -> None:
        """[box] disk_max where no filesystem enforces it (diskwatch.py)."""
        backend = cgroups.for_home(self.home) if self.verify_ports else None
        if not self.disk_max or backend is None:
            return
        from worktreebox.services.diskwatch import DiskWatch
        from worktreebox.system.fsutil import own_bytes

        watch = DiskWatch(self.box_dir, self.disk_max, measure=lambda: own_bytes(self.box_dir),
                          freeze=lambda on: backend.freeze_box(self.box_id, on),
                          event=lambda level, msg: self.event("_box", level, msg, event="disk_max"))
        threading.Thread(target=watch.run, args=(self._done.wait,), name="disk", daemon=True).start()

    def run(self) -> None:
        host = () if self.host_netns_fd is None else (self.host_netns_fd,)
        inherited = (*(self.net.inherited_fds if self.net else ()), *host)
        self.keeper = OutputKeeper(self.logs_dir, self.redact, close_fds=inherited)  # forked before any thread starts
        if self.net is not None:
            self.net.start()
        self.serve()
        if self.host_netns_fd is not None:  # a sandboxed box: `wtbox` typed inside it reaches us
            from worktreebox.services.endpoint import Endpoint

            Endpoint(self.home, self.box_id, self.host_netns_fd).start()
        self.write_state()
        self._watch_busy()
        self._watch_disk()
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
        if self.net is not None:
            self.net.stop()
        self.write_state()


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
    if payload.netns:  # started before the box's network existed: in it before any thread or fork
        enter_network(payload.netns)
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

        def stop_and_finish() -> None:
            sup.stop_all()
            sup.finish()

        def on_term(signum: int, frame: Any) -> None:
            threading.Thread(target=stop_and_finish, daemon=True).start()

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
