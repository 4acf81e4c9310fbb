"""Box supervisors forked from a warm process, the home's zygote, instead of each a fresh Python.

A supervisor is a Python process with ~230 modules loaded (asyncio for the forwards, the OTLP
receiver, ...). Started as its own interpreter, each one spent ~90 ms of CPU importing before it
read its payload, and kept ~11 MB of private memory: those imports, once per box. The zygote
imports them once, moves them out of the garbage collector's reach (`gc.freeze`: a collection
touches every object and would copy every page), and forks one supervisor per request. A forked
supervisor shares those pages with the zygote and with every sibling (copy-on-write); what is
its own is what it writes after the fork (measured in scripts/bench.py --only scale).

Who runs it: the CLI server starts one when it starts (`start`), before it loads the commands'
modules; it ends when the server does (the end of a pipe the server holds), and it refuses, then
ends, when wtbox's code changed since it loaded (system/codestamp), so a supervisor never runs
older code than a fresh one its caller started would (a served command's request carries the digest
of the code its server checked as it forked it: when that is the zygote's, no second walk). Where
none answers (no server yet, WTBOX_NO_SERVER, tests that call Host), `client.start_supervisor`
starts the supervisor as its own Python, as before; likewise where the box has no cgroup, or its
supervisor must be exec'd through nsenter (the sandbox's user mode). A forked supervisor's
environment and command line, as the kernel lists them, are the zygote's (a process cannot rewrite
them without CAP_SYS_RESOURCE), so what finds it is its box's cgroup (exact:
procs.find_box_processes) and its pid file (pid and start time: client.supervisor_pid).

Protocol (system/unixsock framing, run/zygote.sock in the home's 0700 run dir; the caller must be
the zygote's uid):

    client -> zygote    {"op": "supervisor", "home", "box_id", "env", "cwd", "umask", "fds": [n, ...],
                         "stamp" (optional: codestamp.checked())}
                        + descriptors [payload (read end of a pipe), one per number in "fds"]
    launcher -> client  {"pid": <launcher>}, then {"exit": 0} once the supervisor is detached,
                        or {"exit": 1, "error": "<why>"}; end of file without it: it died.
    zygote -> client    {"refused": "<why>"} instead (the client starts the supervisor itself).

The launcher (the zygote's child) becomes what `procs.spawn` made before: its own session, the
box's supervisor cgroup leaf before anything else, the given environment, cwd and umask, each
descriptor at the number the payload names, the payload as stdin, stdout and stderr /dev/null;
then `supervisor.main`: the launcher goes on as the supervisor (the zygote reaps it when it ends).
"""
from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

from worktreebox.config.assets import PACKAGE_PARENT
from worktreebox.system import codestamp, procfs, unixsock
from worktreebox.system.codestamp import code_stamp

SOCKET = "zygote.sock"  # in the home's run dir (the CLI server's, 0700)
LAUNCHER = "launcher.sock"  # in a spare sandbox's run dir: a launcher forked ahead (_wait_as_spare)
PREFORK = "prefork"
RUN = "run"
# the modules a `run` request may start (their main(argv)), named, not imported: they lie above this
# one (a spare is a sandbox's, providers/sandbox/spares.py)
RUNNABLE = ("worktreebox.providers.sandbox.spares",)
LOG = "zygote.log"
ANSWER_TIMEOUT = 5.0  # a zygote answers at once; past this the client starts the supervisor itself
MAX_FDS = 64  # a box's forwards: one per leased and exposed port, and the host's network
TICK = 1.0


# ---------------------------------------------------------------- started by the CLI server

class Started(NamedTuple):
    alive_fd: int  # the write end of the pipe whose closing ends the zygote
    pid: int


def start(home: str) -> Started | None:
    """Start the home's zygote (detached, as its own Python: a fork of the caller would carry the
    caller's modules); None if it could not start (the supervisors then start as before)."""
    alive_r, alive_w = os.pipe()
    try:
        log = os.open(Path(home) / "run" / LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            # -m from the package's parent, as a spawned supervisor (client.start_supervisor)
            proc = subprocess.Popen([sys.executable, "-m", "worktreebox.services.zygote", home, str(alive_r)],
                                    cwd=str(PACKAGE_PARENT), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    pass_fds=(alive_r,), start_new_session=True, env=_own_env())
        finally:
            os.close(log)
    except OSError:
        os.close(alive_w)
        return None
    finally:
        os.close(alive_r)
    return Started(alive_w, proc.pid)


def _own_env() -> dict[str, str]:
    """The zygote's own environment: one glibc arena for all of a supervisor's threads (as a spawned
    supervisor's MALLOC_ARENA_MAX=1); nothing of a box (each launcher sets its box's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WTBOX_") or k == "WTBOX_HOME"}
    env["MALLOC_ARENA_MAX"] = "1"
    return env


# ---------------------------------------------------------------- the client side

class Forked:
    """A supervisor's launcher forked by the zygote, used as start_supervisor used its Popen."""

    def __init__(self, conn: socket.socket, pid: int, stdin: Any) -> None:
        self.conn, self.pid, self.stdin = conn, pid, stdin
        self.error: str | None = None  # what the launcher said when it failed

    def wait(self, timeout: float = 30.0) -> int:
        """The launcher's exit: 0 once the supervisor is detached; 1 (and what it said, logged to the
        box's events by the supervisor itself where it got that far) otherwise."""
        self.conn.settimeout(timeout)
        try:
            while True:
                msg, _ = unixsock.recv(self.conn)
                if "exit" in msg:
                    self.error = msg.get("error")
                    return int(msg["exit"])
        except (OSError, unixsock.ProtocolError):
            return 1
        finally:
            self.conn.close()

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)


def fork_supervisor(home: Path, box_id: str, *, env: dict[str, str], cwd: str, fds: list[int]) -> Forked | None:
    """A launcher for the box's supervisor from the home's zygote, with a pipe for its payload (the
    caller writes it to `.stdin` and closes it); None when no zygote answers or it refuses. The
    launcher forked ahead with the box's spare sandbox (`prefork`) is asked first."""
    ahead = Path(home) / "boxes" / box_id / "run" / LAUNCHER
    for path in (ahead, Path(home) / "run" / SOCKET):
        payload_r, payload_w = os.pipe()
        try:
            asked = _request(path, {"op": "supervisor", "home": str(home), "box_id": box_id, "env": env, "cwd": cwd,
                                    "umask": procfs.umask(), "fds": list(fds)}, [payload_r, *fds])
        finally:
            os.close(payload_r)
        if asked is not None and "pid" in asked[1]:
            return Forked(asked[0], int(asked[1]["pid"]), os.fdopen(payload_w, "wb"))
        if asked is not None:
            asked[0].close()
        os.close(payload_w)
    return None


def _request(path: Path, msg: dict, fds: list[int]) -> tuple[socket.socket, dict] | None:
    """One request to a zygote's socket (or a launcher's forked ahead): the connection, which the caller
    closes, and the first answer; None when nothing answers there."""
    if not path.exists():
        return None
    checked = codestamp.checked()
    if checked is not None:  # the code this process runs, as its server checked it: no second walk there
        msg = {**msg, "stamp": checked}
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        conn.settimeout(ANSWER_TIMEOUT)
        unixsock.connect(conn, str(path))
        unixsock.send(conn, msg, fds=fds)
        answer, _ = unixsock.recv(conn)
    except (OSError, unixsock.ProtocolError):
        conn.close()
        return None
    return conn, answer


# ---------------------------------------------------------------- the zygote

def preload() -> None:
    """What a running supervisor imports (sys.modules of a sandboxed box's with a service, its
    forwards, the OTLP receiver and the box's metrics), then out of the collector's reach: a module
    first imported after the fork is the supervisor's own memory."""
    import ctypes  # noqa: F401  (system/setns, before Python 3.12's os.setns)
    import datetime  # noqa: F401
    import encodings.idna  # noqa: F401  (socket's getaddrinfo of a name)
    import tomllib  # noqa: F401

    import worktreebox.config.assets
    import worktreebox.services.boxnet
    import worktreebox.services.endpoint
    import worktreebox.services.forwards  # asyncio, with ssl hidden (see there)
    import worktreebox.services.otlp_receiver
    import worktreebox.services.supervisor
    import worktreebox.system.cgroups
    import worktreebox.telemetry.collector
    import worktreebox.telemetry.exposition
    import worktreebox.telemetry.store_sleep
    import worktreebox.telemetry.vmclient  # noqa: F401

    gc.collect()
    gc.freeze()


def log(msg: str) -> None:
    os.write(2, f"{time.strftime('%Y-%m-%dT%H:%M:%S')} [{os.getpid()}] {msg}\n".encode(errors="replace"))


class Zygote:
    def __init__(self, home: str, alive_fd: int) -> None:
        self.home, self.alive_fd = home, alive_fd
        self.stamp = code_stamp()  # before importing: an edit made meanwhile counts
        self.digest = codestamp.digest(self.stamp)
        self.path = str(Path(home) / "run" / SOCKET)
        self.listener, self.ino = unixsock.listen(self.path)  # over a dead zygote's socket at once

    def serve(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self._leave("SIGTERM"))
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        preload()
        log(f"serving supervisors of {self.home}")
        while True:
            _reap()
            ready, _, _ = select.select([self.listener.fileno(), self.alive_fd], [], [], TICK)
            if self.alive_fd in ready:
                self._leave("its CLI server ended")
            if self.listener.fileno() not in ready:
                continue
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            with conn:
                why = self._handle(conn)
            if why:
                self._leave(why)

    def _leave(self, why: str) -> None:
        log(f"exiting: {why}")
        unixsock.withdraw(self.path, self.ino)
        os._exit(0)

    def changed(self, msg: dict) -> str | None:
        """The first file of wtbox's code changed since this zygote loaded it, unless the asker runs this
        very code (system/codestamp)."""
        return codestamp.changed_since(self.stamp, self.digest, msg.get("stamp"))

    def _handle(self, conn: socket.socket) -> str | None:
        if unixsock.peer_uid(conn) != os.getuid():
            log("refused a connection from another uid")
            return None
        conn.settimeout(ANSWER_TIMEOUT)
        try:
            msg, fds = unixsock.recv(conn, max_fds=MAX_FDS + 1)
        except (OSError, unixsock.ProtocolError) as e:
            log(f"bad request: {e}")
            return None
        try:
            op = msg.get("op")
            if not _well_formed(msg, fds):
                _reply(conn, {"refused": "not a request this zygote knows"})
                return None
            changed = self.changed(msg)
            if changed:
                _reply(conn, {"refused": f"{changed} changed since the zygote started"})
                return f"{changed} changed"
            if op == RUN:  # nothing to hand back but that it runs: the caller goes on before the fork
                _reply(conn, {"accepted": True})
            if os.fork() == 0:
                code = 1
                try:
                    code = _wait_as_spare(self, conn, msg) if op == PREFORK else \
                        _run_module(self, conn, msg, fds[0]) if op == RUN else _launch(self, conn, msg, fds)
                finally:
                    os._exit(code)
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        return None


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _reply(conn: socket.socket, obj: dict) -> None:
    with contextlib.suppress(OSError):
        unixsock.send(conn, obj)


# ---------------------------------------------------------------- the launcher, in the zygote's child

def _leave_zygote(zygote: Zygote) -> None:
    """A child's first steps: a fresh Python's dispositions (SIGPIPE stays ignored, as Python starts:
    a write to a closed socket must raise in the supervisor, not end it), none of the zygote's
    descriptors, a session of its own."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    zygote.listener.close()
    os.close(zygote.alive_fd)
    os.setsid()


def _launch(zygote: Zygote, conn: socket.socket, msg: dict, fds: list[int], *, placed: bool = False) -> int:
    """Become what procs.spawn made of `python -m worktreebox.services.supervisor HOME BOX`, then run it.
    `placed`: a launcher forked ahead (_wait_as_spare), in the box's supervisor leaf already."""
    if not placed:
        _leave_zygote(zygote)
    home, box_id = str(msg["home"]), str(msg["box_id"])
    conn = _above(conn, fds, msg["fds"])
    try:
        unixsock.send(conn, {"pid": os.getpid()})
        from worktreebox.system import cgroups, procs

        # before anything of the box runs here, as procs.spawn's hook places a spawned one
        if not placed:
            procs.enter_cgroup(cgroups.Leaf(home, box_id, cgroups.SUPERVISOR))
        os.chdir(msg["cwd"])
        os.umask(int(msg["umask"]))  # the caller's, as a spawned supervisor inherits it (not the server's 077)
        os.environ.clear()
        os.environ.update(msg["env"])
        time.tzset()  # its TZ, as a fresh Python reads it (the random module reseeds itself at fork)
        sys.argv = [sys.argv[0], home, box_id]
    except Exception as e:
        _reply(conn, {"exit": 1, "error": f"{type(e).__name__}: {e}"})
        return 1
    from worktreebox.services import supervisor

    def detached() -> None:  # (the supervisor goes on in this process)
        _reply(conn, {"exit": 0})
        conn.close()

    try:
        supervisor.main([home, box_id], detached=detached)
    except Exception as e:
        _reply(conn, {"exit": 1, "error": f"{type(e).__name__}: {e}"})
    return 1


def _well_formed(msg: dict, fds: list[int]) -> bool:
    """A request of a kind the zygote serves, with the descriptors that kind carries."""
    op = msg.get("op")
    return (op == PREFORK and not fds) or (op == "supervisor" and len(fds) == len(msg.get("fds") or []) + 1) \
        or (op == RUN and len(fds) == 1 and msg.get("module") in RUNNABLE)


def _wait_as_spare(zygote: Zygote, conn: socket.socket, msg: dict) -> int:
    """A launcher forked ahead for a spare sandbox (providers/sandbox/spares.py): it moves into the
    spare's supervisor leaf now (on cgroup v1 a move waits for an RCU grace period, ~15-30 ms here,
    which the `new` that takes the spare then does not wait for), listens at the spare's
    run/launcher.sock, and serves one supervisor request there for a box of the spare's hex (its
    cgroup is the spare's) as the zygote would; it ends unused after `ttl` seconds, as the spare does."""
    from worktreebox.box import hex_of
    from worktreebox.system import cgroups, procs

    _leave_zygote(zygote)
    home, box_id = str(msg["home"]), str(msg["box_id"])
    try:
        procs.enter_cgroup(cgroups.Leaf(home, box_id, cgroups.SUPERVISOR))
        path = str(Path(home) / "boxes" / box_id / "run" / LAUNCHER)
        listener, ino = unixsock.listen(path)
    except Exception as e:
        _reply(conn, {"refused": f"{type(e).__name__}: {e}"})
        return 1
    _reply(conn, {"pid": os.getpid()})
    conn.close()
    deadline = time.monotonic() + float(msg.get("ttl") or 0)
    while (left := deadline - time.monotonic()) > 0 and select.select([listener], [], [], left)[0]:
        try:
            client, _ = listener.accept()
        except OSError:
            continue
        client.settimeout(ANSWER_TIMEOUT)
        try:
            request, fds = unixsock.recv(client, max_fds=MAX_FDS + 1)
        except (OSError, unixsock.ProtocolError):
            client.close()
            continue
        changed = zygote.changed(request)
        why = "not this launcher's box" if hex_of(str(request.get("box_id"))) != hex_of(box_id) or \
            unixsock.peer_uid(client) != os.getuid() or request.get("op") != "supervisor" or \
            not _well_formed(request, fds) else f"{changed} changed" if changed else None
        if why is None:  # (the spare's dir is the box's by now: its socket is withdrawn there)
            unixsock.withdraw(str(Path(home) / "boxes" / str(request["box_id"]) / "run" / LAUNCHER), ino)
            listener.close()
            return _launch(zygote, client, request, fds, placed=True)
        _reply(client, {"refused": why})
        client.close()
        for fd in fds:
            os.close(fd)
        if changed:
            break  # older code than a fresh supervisor's: never of use (the caller starts one as usual)
    unixsock.withdraw(path, ino)
    return 0


def _run_module(zygote: Zygote, conn: socket.socket, msg: dict, log_fd: int) -> int:
    """A background job of wtbox's own as a fork of this warm process instead of a fresh Python (the
    spare maker: ~80 ms of CPU for its imports otherwise, after every sandboxed `new`): `module`'s
    main(argv), niced, with the given environment, its output appended to `log_fd`."""
    import importlib

    _leave_zygote(zygote)
    os.nice(int(msg.get("nice") or 0))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    os.chdir(PACKAGE_PARENT)
    os.environ.clear()
    os.environ.update(msg["env"])
    conn.close()
    return int(importlib.import_module(str(msg["module"])).main(list(msg["argv"])) or 0)


def run_module(home: Path, module: str, argv: list[str], *, env: dict[str, str], log_path: Path,
               nice: int = 0) -> bool:
    """Run `module`'s main(argv) as a fork of the home's zygote (`_run_module`): True once the zygote
    took it, False when no zygote answers or it refuses (the caller then starts a Python of its own)."""
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        asked = _request(Path(home) / "run" / SOCKET,
                         {"op": RUN, "module": module, "argv": argv, "env": env, "nice": nice}, [log])
    finally:
        os.close(log)
    if asked is None:
        return False
    asked[0].close()
    return bool(asked[1].get("accepted"))


def prefork(home: Path, box_id: str, ttl: float) -> int | None:
    """Ask the home's zygote for a launcher forked ahead for the spare `box_id` (_wait_as_spare); its
    pid, or None when no zygote answers or it refuses (the box's supervisor then starts as usual)."""
    asked = _request(Path(home) / "run" / SOCKET, {"op": PREFORK, "home": str(home), "box_id": box_id, "ttl": ttl}, [])
    if asked is None:
        return None
    asked[0].close()
    return int(asked[1]["pid"]) if "pid" in asked[1] else None


def _above(conn: socket.socket, fds: list[int], numbers: list[int]) -> socket.socket:
    """The payload at 0, each other received descriptor at the number the payload names it by,
    /dev/null at 1 and 2; `conn` moved above them all (the returned socket)."""
    floor = max([2, *numbers]) + 1
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor) for fd in fds]
    conn_fd = fcntl.fcntl(conn.fileno(), fcntl.F_DUPFD_CLOEXEC, floor)
    conn.close()
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    os.dup2(moved[0], 0)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)
    for fd, number in zip(moved[1:], numbers, strict=True):
        os.dup2(fd, number)
    for fd in moved:
        os.close(fd)
    return socket.socket(fileno=conn_fd)


def main() -> None:
    home, alive_fd = sys.argv[1], int(sys.argv[2])
    os.set_inheritable(alive_fd, False)
    try:
        zygote = Zygote(home, alive_fd)
    except OSError as e:
        log(f"could not listen: {e}")
        return
    zygote.serve()


if __name__ == "__main__":
    main()
