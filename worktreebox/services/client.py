"""The client side of a box's supervisor: start it, talk to it, stop it, read its state.

The supervisor (`worktreebox/services/supervisor.py`) runs detached; this module knows it only
through `worktreebox.services.control` (socket protocol, state file) and its pid file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worktreebox.box import _iso, hex_of
from worktreebox.config.assets import PACKAGE_PARENT
from worktreebox.errors import UsageError, WtboxError
from worktreebox.services import boxenv, control, zygote
from worktreebox.services.control import Request, ServiceState
from worktreebox.services.spec import ForwardSpec, ServiceSpec, SupervisorPayload
from worktreebox.system import cancel, cgroups, procfs, procs, readiness
from worktreebox.telemetry.logs.reader import read_records

if TYPE_CHECKING:
    from worktreebox.box import Box

STOP_TIMEOUT = 20.0
SUPERVISOR_START = 10.0
EXIT_WAIT = 5.0  # after a 'stop' request, how long the supervisor gets to exit by itself
PID_FILE = "supervisor.pid"


LAUNCHED = "supervisor_launched"  # box.data: when start_supervisor last launched one (time.time())


def supervisor_pid(box: Box, *, wait: bool = True) -> int | None:
    """The pid of the box's live supervisor, once it is up: one launched by `new` without waiting for
    it (a box with nothing for it to start, see Sandbox.create) is waited for here (`_await_start`),
    so that no caller takes a starting supervisor for a missing one (and starts a second). With
    `wait` False: the live process its pid file names, up or not."""
    if wait and starting(box):
        return _await_start(box)
    return _live_pid(box)


def starting(box: Box) -> bool:
    """Launched less than SUPERVISOR_START ago and not up yet: no state file (start_supervisor removes
    the last one; the supervisor writes its first once it listens, and its last as it ends)."""
    launched = box.data.get(LAUNCHED)
    return isinstance(launched, (int, float)) and time.time() - launched < SUPERVISOR_START \
        and not (box.run_dir / control.STATE_FILE).exists()


def _await_start(box: Box) -> int | None:
    """A starting supervisor's pid once it is up, waited for what is left of SUPERVISOR_START after its
    launch; None when it did not come up in that time."""
    try:
        return wait_started(box, timeout=float(box.data[LAUNCHED]) + SUPERVISOR_START - time.time())
    except WtboxError:
        return None


def _live_pid(box: Box) -> int | None:
    """The pid its pid file names, if that process lives: the file names its pid and start time (pids are
    reused; a supervisor forked by the zygote has the zygote's command line). A pid file of an
    older wtbox has the pid alone, checked against the command line."""
    try:
        fields = [int(f) for f in (box.run_dir / PID_FILE).read_text().split()]
        pid = fields[0]
    except (FileNotFoundError, ValueError, IndexError):
        return None
    if len(fields) > 1:
        return pid if procs.is_alive(fields[:2]) else None
    if not procs.pid_alive(pid):
        return None
    args = procs.cmdline(pid)
    # The hex suffix, not the whole id: a box claimed from the pool keeps the supervisor started
    # under its pool id (docs/architecture.md, "Names").
    if "worktreebox.services.supervisor" not in args or not any(hex_of(a) == hex_of(box.id) for a in args[-1:]):
        return None
    return pid


def background_wanted(home: Path) -> bool:
    """`[host] background_busy` (default true); a config that cannot be read leaves it on (the
    commands that read it say what is wrong)."""
    from worktreebox.config.load import ConfigError, load_host_config

    try:
        return load_host_config(home).background_busy
    except ConfigError:
        return True


def otlp_port(box: Box) -> int | None:
    """The port the box's supervisor serves its OTLP endpoint on, as the box's processes see it (in a
    sandboxed box: inside its network, where a forward from the leased host port reaches it); None:
    observability is off."""
    return box.inside_ports.get("otlp") if "otlp" in box.ports else None


def give_services(box: Box, secrets: dict[str, str], specs: list[ServiceSpec]) -> None:
    """Hand `specs` to the box's running supervisor (one started early: for the box's OTLP endpoint,
    or by the sandbox resource in the box's network) over its control socket."""
    payload = SupervisorPayload(services=specs, workdir=str(box.path), secrets=dict(secrets))
    checked(control_request(box, control.SERVICES, data=payload.to_json()))


@dataclasses.dataclass
class HostForward:
    """A forward whose listening socket is bound here, in the host's network, before the supervisor
    starts (it inherits it): host `address`:`port` -> `target` in the box."""

    name: str
    port: int
    target: tuple[str, int]
    address: str = "127.0.0.1"

    def bind(self) -> socket.socket:
        """The listening socket (SO_REUSEADDR: a dead supervisor's connections in TIME_WAIT do not
        keep its successor off the port); a port someone else holds fails in one sentence."""
        try:
            return socket.create_server((self.address, self.port), backlog=128)
        except OSError as e:
            who = ", ".join(procs.describe(p) for p in procs.listeners(self.port)) or "a process wtbox cannot see"
            raise WtboxError(f"Port {self.port} ({self.name}) cannot be bound on {self.address}: "
                             f"{e.strerror or e}; it is held by {who}.") from None


@dataclasses.dataclass
class SandboxNet:
    """How a sandboxed box's supervisor starts: in the box's network (`enter`), starting the box's
    processes through `launcher`, hosting `forwards` (host sockets bound here) and `inside` ones."""

    enter: list[str]
    launcher: procs.Launcher
    forwards: list[HostForward] = dataclasses.field(default_factory=list)
    inside: list[ForwardSpec] = dataclasses.field(default_factory=list)
    faults: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    netns: str | None = None  # the box's network namespace (a path), entered by the supervisor itself


def start_supervisor(box: Box, secrets: dict[str, str], specs: list[ServiceSpec], net: SandboxNet | None = None,
                     *, wait: bool = True,
                     later: Callable[[Callable[[SandboxNet], None]], None] | None = None) -> int | None:
    """Start the detached supervisor; specs and secrets go over a pipe to its stdin, nowhere else.
    With `net` (a sandboxed box) it starts in the box's network, with the host sockets of its
    forwards and the host's network namespace as inherited descriptors.

    With `later` as well, the supervisor starts before the box's network exists: `later(give)` makes
    it while the supervisor starts, and calls `give(net)` with the rest as soon as the network
    namespace exists (its own work may go on: the supervisor starts meanwhile); the supervisor enters
    `netns` itself before it forks. If `later` fails before it gave, the waiting process is killed
    before it read anything."""
    box.logs_dir.mkdir(parents=True, exist_ok=True)
    box.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    box.data[LAUNCHED] = time.time()
    for stale in (PID_FILE, control.SOCKET, control.STATE_FILE):
        try:
            (box.run_dir / stale).unlink()
        except FileNotFoundError:
            pass
    env = boxenv.process_env(box)
    env.pop("PYTHONSTARTUP", None)
    # One glibc arena for all its threads (by default each thread that allocates gets one, and
    # the supervisor has seven that mostly sleep); the supervisor drops it from what its services get.
    env["MALLOC_ARENA_MAX"] = "1"
    # started while the box is made (sandbox), before its env is whole: what names it as its box's
    env.update({"WTBOX_ID": box.id, "WTBOX_BOX_DIR": str(box.dir)})
    # -m finds the package from the cwd, so this works from a checkout as well as when installed.
    pkg_parent = str(PACKAGE_PARENT)
    home = box.dir.parent.parent
    disk = box.data.get("disk") or {}
    payload = SupervisorPayload(services=specs, workdir=str(box.path), secrets=dict(secrets),
                                otlp_port=otlp_port(box), background_busy=background_wanted(home),
                                disk_max=disk.get("max") if disk.get("mode") == "watch" else None)
    argv = [sys.executable, "-m", "worktreebox.services.supervisor", str(home), box.id]
    held: list[socket.socket] = []
    fds: list[int] = []
    try:
        if net is not None:
            argv = [*net.enter, *argv]
            held = [f.bind() for f in net.forwards]
            fds = [os.open(procfs.namespace_file(os.getpid(), "net"), os.O_RDONLY | os.O_CLOEXEC)]
        passed = [*fds, *(s.fileno() for s in held)]
        leaf = cgroups.Leaf(home, box.id, cgroups.SUPERVISOR)
        # Forked by the home's zygote where one runs (services/zygote.py: ~90 ms of CPU saved, its PSS
        # 13.5 -> 8 MB); it needs the box's cgroup (what finds a forked supervisor) and no exec.
        exec_through = net is not None and bool(net.enter)
        forked = None if exec_through or cgroups.placement(leaf) is None else \
            zygote.fork_supervisor(home, box.id, env=env, cwd=pkg_parent, fds=passed)
        proc = forked or procs.spawn(argv, cwd=pkg_parent, env=env, stdin=subprocess.PIPE, pass_fds=passed,
                                     cgroup=leaf)
        given: list[SandboxNet | None] = []

        def give(made: SandboxNet | None) -> None:
            if made is not None:
                payload.launcher = made.launcher.to_json()
                paired = zip(made.forwards, held, strict=True)
                payload.forwards = [*(ForwardSpec(f.name, f.target, fd=s.fileno()) for f, s in paired), *made.inside]
                payload.faults, payload.host_netns_fd, payload.netns = dict(made.faults), fds[0], made.netns
            given.append(made)
            assert proc.stdin is not None  # stdin=PIPE
            try:
                proc.stdin.write(json.dumps(payload.to_json()).encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass

        if later is None:
            give(net)
        else:
            assert net is not None
            first = net
            try:
                later(lambda made: give(dataclasses.replace(made, forwards=first.forwards)))
                if not given:
                    raise WtboxError(f"The network of {box.id} was never given to its supervisor.")
            except BaseException:
                if not given:
                    proc.kill()
                    proc.wait()
                raise
    finally:
        for s in held:
            s.close()  # the supervisor holds them now
        for fd in fds:
            os.close(fd)
    if not wait and not isinstance(proc, zygote.Forked):
        # A fresh Python's launcher reads its payload after its imports (~70 ms; a zygote's child at
        # once) and then forks the supervisor: reaped on a thread, not waited for (see supervisor_pid)
        threading.Thread(target=_reap_launcher, args=(box, proc), daemon=True, name="wtbox-launcher").start()
        return None
    failed = _launcher_failed(box, proc)
    if failed:
        raise WtboxError(failed)
    return wait_started(box) if wait else None


def _launcher_failed(box: Box, proc: subprocess.Popen[bytes] | zygote.Forked) -> str | None:
    """What the supervisor's launcher said when it exited other than with 0 (it forks the supervisor and
    exits at once), or None."""
    rc = proc.wait()
    if rc == 0:
        return None
    said = proc.error if isinstance(proc, zygote.Forked) else None
    why = f": {said}" if said else f" (exit code {rc})"
    return f"The services supervisor of {box.id} failed to start{why}."


def _reap_launcher(box: Box, proc: subprocess.Popen[bytes]) -> None:
    """A launcher not waited for: what went wrong goes to the box's logs, where `wtbox logs` shows it."""
    failed = _launcher_failed(box, proc)
    if failed:
        from worktreebox.telemetry.logs.writer import EventLog

        with contextlib.suppress(OSError):
            EventLog(box.logs_dir)("_supervisor", "error", failed)


def wait_started(box: Box, timeout: float = SUPERVISOR_START) -> int:
    """The pid of the box's supervisor once it listens on its socket (it wrote its pid and its first state)."""
    pids: list[int] = []

    def started(timeout: float) -> bool:
        """It wrote its pid file and its first state (it listens on its socket by then)."""
        pid = _live_pid(box)
        if pid and (box.run_dir / control.STATE_FILE).exists():
            pids.append(pid)
        return bool(pids)

    if readiness.wait(readiness.Probe(started), max(0.0, timeout), poll=0.002) is not None:
        raise WtboxError(f"The services supervisor of {box.id} did not start; see 'wtbox logs {box.id}'.")
    return pids[0]


def control_request(box: Box, cmd: str, service: str | None = None, timeout: float = 120.0, *,
                    data: dict[str, Any] | None = None, fds: list[int] | None = None) -> control.Response:
    """Send one command to the supervisor's socket and return its answer (a supervisor still starting:
    once it is up, see `supervisor_pid`)."""
    if starting(box):
        _await_start(box)
    return control.request(box.run_dir, Request(cmd, service, data=data, fds=list(fds or [])), timeout)


def checked(resp: control.Response) -> control.Response:
    """The answer, or UsageError with the supervisor's refusal."""
    if not resp.ok:
        raise UsageError(str(resp.error or "the supervisor refused the command").rstrip(".") + ".")
    return resp


def stop_supervisor(box: Box) -> None:
    """Stop the supervisor and its services: socket 'stop', then a staged stop by pid. Idempotent."""
    pid = supervisor_pid(box)
    if pid is None:
        return
    try:
        control_request(box, control.STOP, timeout=STOP_TIMEOUT)
    except (OSError, ValueError):
        pass
    if procs.wait_gone([pid], EXIT_WAIT):
        procs.stop_pid(pid, STOP_TIMEOUT)


def collect_now(box: Box) -> None:
    """Ask the box's supervisor to push its own metrics now (before a query); nothing when none runs."""
    if (box.data.get("metrics") or {}).get("url") and supervisor_pid(box) is not None:
        try:
            control_request(box, control.COLLECT, timeout=5)
        except (OSError, ValueError):
            pass


def box_secrets(box: Box) -> dict[str, str]:
    """The --secret values of a running box (for `wtbox exec`); {} when no supervisor runs."""
    if supervisor_pid(box) is None:
        return {}
    try:
        resp = control_request(box, control.ENV_SECRETS, timeout=5)
    except (OSError, ValueError):
        return {}
    return dict(resp.secrets or {})


# ---------------------------------------------------------------- state

def read_state(box: Box, *, wait: bool = True) -> control.SupervisorState | None:
    """Its last state; that of a supervisor still starting once it is up (`supervisor_pid`), or with
    `wait` False None at once (`starting` says why)."""
    if wait and starting(box):
        _await_start(box)
    return control.read_state(box.run_dir)


def last_lines(box: Box, service: str, n: int = 10) -> list[str]:
    """The service's last output lines, of its last run only (a service restarted five times printed
    the same lines five times)."""
    try:
        recs = read_records(box.logs_dir, services=[service], tail=n * 4)
    except OSError:
        return []
    starts = [r.get("ts", "") for r in recs if r.get("event") == "start"]
    if starts:  # by time, not position: a start and its first line may share a millisecond
        recs = [r for r in recs if r.get("ts", "") >= starts[-1]]
    lines = [line for r in recs if r.get("stream") != "event" for line in str(r.get("msg", "")).splitlines()]
    return lines[-n * 3:]


def wait_ready(box: Box, names: list[str], deadline: float) -> None:
    """Return when every service is ready; raise naming the first that failed, with its last lines."""
    delay = 0.01
    while True:
        state = read_state(box)
        services = state.services if state else {}
        none = ServiceState()
        bad = next((n for n in names if services.get(n, none).failed), None)
        if bad is None and names and all(services.get(n, none).done for n in names):
            return
        alive = supervisor_pid(box) is not None
        if bad is None and not alive:
            bad = next((n for n in names if not services.get(n, none).done), names[0])
            why = "the supervisor exited"
        elif bad is None and time.time() > deadline:
            bad = next((n for n in names if not services.get(n, none).done), names[0])
            why = "it did not become ready in time"
        elif bad is not None:
            why = services[bad].error or services[bad].state
        else:
            cancel.sleep(delay)
            delay = min(delay * 1.5, 0.1)
            continue
        lines = last_lines(box, bad)
        tail = "\n".join("  " + line for line in lines) or "  (no output)"
        raise WtboxError(f"Service {bad!r} failed to start ({why}); its last log lines:\n{tail}")


def _service_alive(box: Box, name: str, pid: int) -> bool:
    """Is `pid` still this box's service `name` (not a reused pid)? Its environment says (WTBOX_SERVICE)."""
    from worktreebox.system import procfs

    env = procfs.environ(pid)
    return env is not None and procfs.environ_value(env, "WTBOX_SERVICE") == name and \
        procfs.environ_value(env, "WTBOX_ID") in (box.id, box.data.get("pool_id"))


def services_status(box: Box) -> dict[str, dict[str, Any]]:
    """Per service: state, pid, port, ready time, restarts (stopped when no supervisor runs; none yet
    from one still starting, which has none: `new` waits for a supervisor it gives services to)."""
    state = read_state(box, wait=False)
    if not state:
        return {}
    alive = supervisor_pid(box) is not None
    out = {}
    for name, s in state.services.items():
        row: dict[str, Any] = {"state": s.state, "pid": s.pid, "port": s.port, "ready_seconds": s.ready_seconds,
                               "restarts": s.restarts, "exit_code": s.exit_code, "error": s.error,
                               "started_at": _iso(s.started_at), "ready_at": _iso(s.ready_at)}
        if not alive:  # a dead supervisor's services may still run (their pipes are the keeper's)
            running = s.pid is not None and _service_alive(box, name, s.pid)
            row["state"], row["pid"] = ("unsupervised", s.pid) if running else ("stopped", None)
        out[name] = row
    return out
