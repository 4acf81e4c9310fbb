"""The per-box supervisor, the box's one wtbox process: `python -m worktreebox.services.supervisor <home> <box_id>`.

Like honcho, three parts: a `Service` is what runs (service.py: one process group, readiness,
restarts with backoff), the `Supervisor` coordinates (dependency order, the control socket, the
state file, OOM reports, the box's own metrics), and `Output` (output.py) writes the services'
output to the logs. It also serves the box's OTLP/HTTP endpoint (otlp_receiver.py), so a box
with observability has it from its start phase on, services or not (`down` stops the services,
not the endpoint).

A few threads, each asleep in the kernel on one thing, and no timer while the box is quiet: the
main loop (a change), the control socket (accept), one per service (waitpid; readiness polls
only while it starts), the output follower (dnotify), the receiver (accept, then one per
connection), the box watch (its own cadence: 4 s while calm, background.py). Threads rather than
one event loop because each of them blocks in a call that has no asynchronous form (waitpid,
the readiness probes, h11 over blocking sockets), and a thread that sleeps costs nothing; an
asyncio part (the forwards) runs its loop in a thread of its own.

It gets a `SupervisorPayload` (the rendered `ServiceSpec`s, the `--secret` values, the OTLP
port) on stdin, or the services later over its socket (control.SERVICES: one started early, for
the OTLP endpoint or by the sandbox resource); the secrets live only in memory and in the services'
environment, the box env in the box env file. Stopping is staged (procs.stop_groups); what clients
may send and read is `worktreebox.services.control`. A sandboxed box's runs in the box's network
namespace (only): it hosts the forwards (boxnet.py), serves the endpoint, starts services through the box's launcher.

Test seams: a `Clock` and a `Processes` factory (service.py) are injected, so restart backoff
and ready timeouts are unit-tested without real time.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worktreebox.errors import WtboxError
from worktreebox.secrets import Redactor, secret_values
from worktreebox.services import control
from worktreebox.services.boxnet import BoxNet, enter_network
from worktreebox.services.control import EXITED, FAILED, READY, STOPPED, Request, Response
from worktreebox.services.envfile import read_env_file
from worktreebox.services.output import Output
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
from worktreebox.services.spec import SupervisorPayload
from worktreebox.system import background, cgroups, procfs, procs
from worktreebox.telemetry.logs.writer import EventLog

__all__ = ["BACKOFF_CAP", "BACKOFF_START", "NO_CHECK_GRACE", "STABLE_AFTER", "Clock", "Processes", "Service",
           "Supervisor", "main"]

COLLECT_EVERY = 5.0  # seconds between pushes of the box's own metrics while it is active
# ... while it is calm: a slow steady rate, and on demand (a `metrics` query asks first). Each push
# starts the box's sleeping store again (~25 ms of CPU; store_sleep.py), which it then lets sleep.
COLLECT_CALM = 300.0
OOM_SETTLE = 0.5  # seconds an OOM kill is given to free its victim's memory before the record is taken
OWN_LEAVES = (cgroups.SUPERVISOR, cgroups.METRICS, cgroups.TRACES)  # wtbox's own: not the box's activity


class Supervisor:
    """Coordinates a box's services: starts them in dependency order, answers the control socket,
    keeps the state file, reports OOM kills and pushes the box's own metrics."""

    def __init__(self, home: Path, box_id: str, payload: SupervisorPayload, *, clock: Clock | None = None,
                 processes: Processes | None = None, check: ReadyCheck | None = None) -> None:
        self.home, self.box_id = home, box_id
        self.box_dir = home / "boxes" / box_id
        self.run_dir, self.logs_dir = self.box_dir / "run", self.box_dir / "logs"
        self.clock = clock or Clock()
        self.processes = processes or Processes(home, box_id, procs.Launcher.from_json(payload.launcher))
        self.net = BoxNet(payload.forwards, payload.faults) if payload.forwards else None
        self.host_netns_fd = payload.host_netns_fd  # the host's network: where `wtbox` run for the box works
        self.check_ready: ReadyCheck = check or check_ready
        # Real processes only: port ownership is asked of the kernel (fakes in tests hold no ports).
        self.verify_ports = processes is None
        self.output: Output | None = None  # made by run()
        self.receiver: Any = None  # otlp_receiver.Running, when the box has an OTLP port
        self.otlp_port = payload.otlp_port
        self.background_busy = payload.background_busy
        self.stopping = False
        self.events = EventLog(self.logs_dir)
        self.services: dict[str, Service] = {}
        self.take(payload)
        self._state_lock = threading.Lock()
        self._dirty, self._done = threading.Event(), threading.Event()
        self.started_at = self.clock.now()
        self.oom = cgroups.OomWatch(home, box_id)
        self._collect_lock, self._oom_lock = threading.Lock(), threading.Lock()
        self._busy_watch: threading.Thread | None = None
        self.store_sleep: Any = None  # telemetry.store_sleep.StoreSleep of a box whose store can sleep
        self._backend: cgroups.Cgroups | None = None  # the box cgroups, when the watch has them
        self._last_collect, self._next_collect = 0.0, self.clock.now() + 1.0
        self._was_active = True  # the first calm look gives back what starting up used
        self.disk_max = payload.disk_max

    def take(self, payload: SupervisorPayload) -> None:
        """The services to run, with the --secret values and the box env they run with (read again:
        a supervisor started early, for the OTLP endpoint or in a sandbox, may have run before it
        was written)."""
        self.secrets = {**getattr(self, "secrets", {}), **payload.secrets}
        self.workdir = payload.workdir or str(self.box_dir / "worktree")
        self.box_env = read_env_file(self.box_dir / "env")
        self.metrics_url = self.box_env.get("WTBOX_METRICS_URL")
        self.redact = Redactor(list(self.secrets.values()) + secret_values(self.box_env))
        if self.receiver is not None:
            self.receiver.receiver.metrics_url = self.metrics_url
        for s in self.services.values():
            s.writer.close()
        self.services = {s.name: Service(self, s) for s in payload.services}

    def writer_for(self, service: str) -> Any:
        """The log writer of a service's output (output.py), also of one no longer configured."""
        if service in self.services:
            return self.services[service].writer
        from worktreebox.telemetry.logs.writer import LogWriter

        return LogWriter(self.logs_dir, service, self.redact)

    def event(self, service: str, level: str, msg: str, **extra: Any) -> None:
        try:
            self.events(service, level, self.redact(msg), **extra)
        except OSError:
            pass

    def changed(self) -> None:
        self._dirty.set()

    def check_oom(self, push: bool = True) -> None:
        """Record each OOM kill in the box as an error event naming the process (the service is
        restarted as for any crash), and push the counters at once (`push`)."""
        # One caller at a time, from taking the kills to writing them: the OOM thread may take a
        # kill while the service's thread checks before it logs its restart, which must come after.
        with self._oom_lock:
            kills = self.oom.new_kills()
            if not kills:
                return
            limit = self.oom.memory_max()
            why = f"the box reached its memory limit (memory_max {_size(limit)})" if limit else "out of memory"
            for k in kills:
                who = f"process {k['pid']} ({k['task']})" if k["pid"] else "a process"
                self.event(k["leaf"], "error", f"{k['leaf']}: the kernel killed {who}: {why}", event="oom",
                           pid=k["pid"], task=k["task"], memory_max=limit)
        if push:
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
        if self.output is not None:
            self.output.close()
        for s in self.services.values():
            s.writer.close()
        if self.receiver is not None:
            self.receiver.stop()

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
            elif req.cmd == control.COLLECT:
                self.check_oom()
                self.collect()
            elif req.cmd == control.WAKE_STORE:  # a reader's: the store answers when this returns
                from worktreebox.telemetry.store_sleep import Store

                Store(self.home, self.box_id, self.run_dir).wake()
            elif req.cmd == control.STOP:
                self.stop_all()  # the reply is sent before the process exits (see _after)
            elif req.cmd == control.SERVICES:
                self.take_services(SupervisorPayload.from_json(req.data or {}))
            elif req.cmd in (control.NET, control.FORWARD, control.UNFORWARD):
                self.net = self.net or BoxNet([])
                self.net.handle(req)
            else:
                return Response(ok=False, error=f"unknown command {req.cmd!r}")
        except KeyError:
            known = ", ".join(self.services)
            return Response(ok=False, error=f"the box has no service {req.service!r}; it has: {known}")
        except (ValueError, OSError, WtboxError) as e:  # UsageError is a ValueError too: a refusal in one sentence
            return Response(ok=False, error=str(e).rstrip("."))
        self.write_state()
        return Response(ok=True, services={n: s.info() for n, s in self.services.items()})

    def take_services(self, payload: SupervisorPayload) -> None:
        """The services of a supervisor started early (`services` request): they start now, in
        dependency order; the caller waits for them (client.wait_ready)."""
        if any(s.wanted for s in self.services.values()):
            raise ValueError("the box's services are running; stop them first")
        self.take(payload)
        self._next_collect = self.clock.now()  # the box env may be new (where to push): at the next look
        self._sleep_store()
        self.up(wait=False)

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
        if self.store_sleep is not None:
            self.store_sleep.for_push()
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

    def _serve_otlp(self) -> None:
        """The box's OTLP endpoint, in this process (otlp_receiver.py); a port that cannot be bound
        is an error event, and the services run all the same."""
        if not self.otlp_port:
            return
        from worktreebox.services import otlp_receiver

        try:
            self.receiver = otlp_receiver.start(self.box_dir, self.box_id, self.otlp_port, self.metrics_url,
                                                supervisor_secrets=lambda: self.secrets,
                                                wake_store=self._store_for_push)
        except OSError as e:
            self.event("_otlp", "error", f"the OTLP endpoint cannot listen on 127.0.0.1:{self.otlp_port}: {e}")

    def _store_for_push(self) -> None:
        if self.store_sleep is not None:
            self.store_sleep.for_push()

    def _watch(self) -> None:
        """One thread watches the box, woken by nothing but its own cadence (background.py): while
        the box keeps every CPU busy it runs as background; its own metrics are pushed every
        COLLECT_EVERY while it is active, COLLECT_CALM while calm; its store sleeps while calm
        (store_sleep.py). OOM kills wake a thread of their own (the kernel's event)."""
        backend = cgroups.for_home(self.home) if self.verify_ports else None
        if backend is None:
            self._busy_watch = threading.Thread(target=self._collect_calmly, name="watch", daemon=True)
        else:
            self._backend = backend
            self._sleep_store()
            watch = background.BusyWatch(lambda: backend.cpu_pids(self.box_id),
                                         lambda on: backend.set_background(self.box_id, on),
                                         cpu_seconds=lambda: _box_activity(backend, self.box_id),
                                         switch=self.background_busy)
            self._busy_watch = threading.Thread(target=watch.run, args=(self._done.wait, self._after_look),
                                                name="watch", daemon=True)
            self._watch_oom(backend)
        self._busy_watch.start()

    def _sleep_store(self) -> None:
        """A native store sleeps while the box is calm (store_sleep.py); known once the box env is."""
        if self._backend is not None and self.metrics_url and self.store_sleep is None:
            from worktreebox.telemetry.store_sleep import StoreSleep

            self.store_sleep = StoreSleep.of(self.home, self.box_id, self.run_dir,
                                             report=lambda msg: self.event("_box", "error", msg))

    def _watch_oom(self, backend: cgroups.Cgroups) -> None:
        """Record an OOM kill as it happens (the kernel's event, no polling): a process that was not
        a service's main one (those are seen when they exit) is named at once."""
        wait = backend.oom_event(self.box_id)
        if wait is None:
            return

        def run() -> None:
            # No push from here: the box is at its limit while the victim's memory is being freed,
            # and a push allocates (the active box's next look pushes within COLLECT_EVERY).
            while not self._done.is_set() and wait():
                # The event comes as the kernel picks its victim, before that memory is freed: any
                # allocation now can start a second OOM whose victim is this process (seen).
                if self._done.wait(OOM_SETTLE):
                    return
                self.check_oom(push=False)

        threading.Thread(target=run, name="oom", daemon=True).start()

    def _after_look(self, active: bool) -> None:
        if self.store_sleep is not None:
            self.store_sleep.look(active)
        now = self.clock.now()
        if now >= self._next_collect or (active and now >= self._last_collect + COLLECT_EVERY):
            self._last_collect, self._next_collect = now, now + COLLECT_CALM
            self.check_oom()
            self.collect()
        if self._was_active and not active:
            procfs.give_back_memory()
        self._was_active = active

    def _collect_calmly(self) -> None:
        """Without box cgroups there is nothing to tell activity by: push at the calm rate."""
        while not self._done.wait(COLLECT_CALM):
            self.check_oom()
            self.collect()

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
        from worktreebox.services import output

        self.output = Output(output.directory(self.home, self.box_id), self.writer_for)
        if self.net is not None:
            self.net.start()
        self._serve_otlp()
        self.serve()
        if self.host_netns_fd is not None:  # a sandboxed box: `wtbox` typed inside it reaches us
            from worktreebox.services.endpoint import Endpoint

            Endpoint(self.home, self.box_id, self.host_netns_fd).start()
        self.write_state()
        self._watch()
        self._watch_disk()
        for s in self.services.values():
            s.up()
        # Woken by a change only (a service's thread, a control request, a stop): no timer.
        while not self._done.is_set():
            self._dirty.wait()
            self._dirty.clear()
            self.write_state()
        if self._busy_watch is not None:
            self._busy_watch.join(2.0)  # it makes the box a normal box again as it ends
        if self.net is not None:
            self.net.stop()
        self.write_state()


def _box_activity(backend: cgroups.Cgroups, box_id: str) -> float | None:
    """CPU seconds the box's processes used so far, wtbox's own (this process, the store, the
    receiver) aside: a few cgroup file reads."""
    total = backend.cpu_seconds(box_id)
    if total is None:
        return None
    return total - sum(backend.cpu_seconds(box_id, leaf) or 0.0 for leaf in OWN_LEAVES)


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} bytes"


def main(argv: list[str] | None = None, *, detached: Callable[[], None] | None = None) -> None:
    """`detached()`: told once the supervisor is detached (zygote.py): a zygote's launcher is the
    zygote's child already (the zygote reaps it), so it goes on as the supervisor, without a fork."""
    argv = sys.argv[1:] if argv is None else argv
    home, box_id = Path(argv[0]), argv[1]
    # The payload (with the secrets) comes on stdin (a pipe from the resource), never through argv, env or a file.
    raw = sys.stdin.buffer.read() if not sys.stdin.isatty() else b""
    payload = SupervisorPayload.from_json(json.loads(raw) if raw.strip() else {})
    if payload.netns:  # started before the box's network existed: in it before any thread or fork
        enter_network(payload.netns)
    # What it inherited from its starter (the forwards' host sockets, the host's network): close-on-exec,
    # so nothing it starts holds them (a service outliving it would keep a host port bound).
    for fd in [f.fd for f in payload.forwards] + [payload.host_netns_fd]:
        if fd is not None:
            os.set_inheritable(fd, False)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    # Fork once more so the supervisor is nobody's child (the caller reaps the parent at once); a
    # zygote's launcher skips it (~4-8 ms of copying its page tables, in every served start)
    if detached is not None:
        detached()
    elif os.fork() > 0:
        os._exit(0)
    os.environ.pop("MALLOC_ARENA_MAX", None)  # set by the client for this process only (client.py)
    pid_file = (run_dir := home / "boxes" / box_id / "run") / "supervisor.pid"
    sup = None
    try:
        sup = Supervisor(home, box_id, payload)
        pid_file.write_text(" ".join(map(str, procs.identity(os.getpid()) or [os.getpid()])) + "\n")

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
