"""The CLI server: wtbox's imports loaded once, a forked child per command (chg-style).

One server per home ($WTBOX_HOME/run/cli.lock held, socket run/cli.sock in a 0700 run/). The
launcher (launcher.py) sends argv, environment, umask, cwd and its stdio (cliproto.py); a
child of the server becomes that command: the caller's fds as 0/1/2, its cwd, its environment
and umask, default signal handlers, then `worktreebox.cli.main.run()`. It reports its exit code, and
SIGKILLs itself if the launcher disappears (kill -9), so a killed served `wtbox new` leaves
what a killed in-process one leaves and gc sweeps it alike.

The server never runs old code: before each command it re-stats wtbox's .py files, the Python
executable and site-packages; if anything changed it refuses (the launcher runs the command
itself) and exits. It also exits after WTBOX_SERVER_IDLE seconds without a command (600), and
when its home or run dir is gone.

cgroups: the server and its children live in the cgroup of whoever started the server (the
launcher never does so from inside a box). That is the same as an in-process `wtbox new` living
in its caller's cgroup: every process a box runs is started by procs.spawn(cgroup=...), whose
preexec hook puts it into its box cgroup before it execs (cgroups.placement), whichever
process spawns it.

Nothing here logs or stores a request's environment: it exists only in the socket and the child.
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import importlib
import io
import os
import select
import signal
import socket
import stat
import sys
import threading
import time
import types

from worktreebox import settings
from worktreebox.cli import protocol as cliproto
from worktreebox.system import codestamp, unixsock
from worktreebox.system.codestamp import code_stamp, first_change

TICK = 1.0  # how often an idle server checks its home (and its idle time)
REQUEST_TIMEOUT = 5.0  # a connected launcher sends its request at once


def main() -> None:
    home = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else None
    os.closerange(3, _max_fd())  # whatever the spawning launcher had open is not ours to keep
    os.chdir("/")
    os.umask(0o077)
    if not home or not os.path.isdir(home):
        return
    run = _own_run_dir(home)
    if run is None:
        return
    lock = os.open(cliproto.lock_path(home), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    if not _lock(lock):
        return  # another server has this home
    log = os.open(cliproto.log_path(home), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    idle = _idle_seconds()
    Server(home, lock, idle).serve()


def _lock(fd: int, wait: float = 0.5) -> bool:
    """The home's lock; a launcher's brief look at it (cliproto.server_holds_lock) is waited out."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)


def _max_fd() -> int:
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (ValueError, OSError):
        return 1024


def _own_run_dir(home: str) -> str | None:
    """run/ as a directory only we may enter (made if missing), else None (then no server)."""
    run = cliproto.run_dir(home)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(run, 0o700)
        st = os.lstat(run)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        return None
    if st.st_mode & 0o077:
        os.chmod(run, 0o700)
    return run


def _idle_seconds() -> float:
    return max(1.0, settings.SERVER_IDLE.seconds())


def log(msg: str) -> None:
    os.write(2, f"{time.strftime('%Y-%m-%dT%H:%M:%S')} [{os.getpid()}] {msg}\n".encode(errors="replace"))


# ---------------------------------------------------------------- what is loaded, and whether it changed

def preload() -> None:
    """Import what the served commands import (sys.modules after new/rm/ls/status in database mode),
    on this thread: the server must have no other thread when it forks."""
    from worktreebox import providers, resources
    from worktreebox.cli import main as cli

    names = ["worktreebox.cli.main", "worktreebox.host", "worktreebox.fleet.gc", "worktreebox.fleet.pool",
             "worktreebox.fleet.doctor", "worktreebox.providers.postgres.spares", "worktreebox.fleet.fanout",
             "worktreebox.services.client", "psycopg", "psycopg.rows", "jinja2", "psutil", "rich.console", "rich.table",
             # what a `new` of a repo without a database imports besides (sys.modules before and after one)
             "concurrent.futures.thread", "portpicker", "worktreebox.fleet.fingerprint", "worktreebox.layers.trees",
             "worktreebox.providers.sandbox.gitdir", "worktreebox.system.leases", "worktreebox.system.users"]
    names += sorted({f"worktreebox.cli.commands.{t.split(':')[0]}"
                     for c, t in cli.COMMANDS.items() if c in cliproto.SERVED})
    names += [f"worktreebox.resources.{e.split(':')[0]}" for e in resources.ORDER]
    names += [f"worktreebox.providers.{t.split(':')[0]}" for kind in providers.PROVIDERS.values()
              for name, t in kind.items() if name != "docker"]  # docker ones import testcontainers: docker only
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:
            log(f"preload: {name}: {type(e).__name__}: {e}")


# ---------------------------------------------------------------- the server

class Server:
    def __init__(self, home: str, lock_fd: int, idle: float) -> None:
        self.home = home
        self.lock_fd = lock_fd
        self.idle = idle
        self.since = time.time()
        self.served = 0
        self.stamp = code_stamp()  # before importing: an edit made during the preload counts
        self.digest = codestamp.digest(self.stamp)
        self.listener, self.sock_ino = self._bind()
        self.zygote_fd: int | None = None

    def _bind(self) -> tuple[socket.socket, int]:
        """Listen before preloading, so a command that arrives now waits for us instead of
        running in process and starting another server."""
        return unixsock.listen(cliproto.socket_path(self.home))  # over a dead server's socket at once

    def serve(self) -> None:
        log(f"serving {self.home} (python {sys.executable}, idle exit after {self.idle:.0f} s)")
        signal.signal(signal.SIGTERM, lambda *_: self._leave("SIGTERM"))
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        # the boxes' supervisors' zygote, ending with us (services/zygote.py); before our own imports
        from worktreebox.services import zygote

        started = zygote.start(self.home)
        self.zygote_fd = started.alive_fd if started else None
        preload()
        if threading.active_count() > 1:
            log(f"warning: {threading.active_count() - 1} threads started by imports; forking anyway")
        last = time.monotonic()
        while True:
            self._reap()
            why = self._why_leave(time.monotonic() - last)
            if why:
                self._leave(why)
            ready, _, _ = select.select([self.listener], [], [], TICK)
            if not ready:
                continue
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            last = time.monotonic()
            with conn:
                try:
                    why = self._handle(conn)
                except Exception as e:
                    log(f"could not serve a request: {type(e).__name__}: {e}")
                    why = None
            if why:
                self._leave(why)

    def _why_leave(self, idle_for: float) -> str | None:
        from worktreebox.system import home_records as homes

        if idle_for >= self.idle:
            return f"idle for {idle_for:.0f} s"
        if homes.gone(self.home) or not os.path.isdir(cliproto.run_dir(self.home)):
            return "its home is gone"
        try:
            if os.stat(cliproto.socket_path(self.home)).st_ino != self.sock_ino:
                return "its socket was replaced"
        except OSError:
            return "its socket is gone"
        return None

    def _withdraw(self) -> None:
        """Take our socket away (if it still is ours) and give up the home's lock."""
        unixsock.withdraw(cliproto.socket_path(self.home), self.sock_ino)
        with contextlib.suppress(OSError):
            os.close(self.lock_fd)

    def _leave(self, why: str) -> None:
        log(f"exiting: {why} ({self.served} commands served)")
        self._withdraw()
        os._exit(0)  # children run on without us; they hold their own connection

    @staticmethod
    def _reap() -> None:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass

    def _handle(self, conn: socket.socket) -> str | None:
        """One connection; a reason to exit after it, or None."""
        uid = cliproto.peer_uid(conn)
        if uid != os.getuid():
            log(f"refused a connection from uid {uid}")
            return None
        conn.settimeout(REQUEST_TIMEOUT)
        try:
            msg, fds = cliproto.recv(conn, max_fds=4)
        except (OSError, cliproto.ProtocolError) as e:
            log(f"bad request: {e}")
            return None
        try:
            op = msg.get("op")
            if op == "status":
                self._reply(conn, {"pid": os.getpid(), "since": self.since, "served": self.served,
                                   "home": self.home, "idle_s": self.idle, "python": sys.executable})
            elif op == "stop":
                self._reply(conn, {"stopping": True})
                return "asked to stop"
            elif op == "run" and len(fds) == 4:
                if msg.get("install") != cliproto.install():
                    self._reply(conn, {"refused": "another wtbox install"})
                    return None
                changed = first_change(self.stamp, code_stamp())
                if changed:
                    self._withdraw()  # first: the launcher starts a fresh server as soon as we refuse
                    self._reply(conn, {"refused": f"{changed} changed since the server started"})
                    return f"{changed} changed"
                self._fork(conn, msg, fds)
            else:
                self._reply(conn, {"refused": "not a request this server knows"})
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        return None

    @staticmethod
    def _reply(conn: socket.socket, obj: dict) -> None:
        with contextlib.suppress(OSError):
            cliproto.send(conn, obj)

    def _fork(self, conn: socket.socket, msg: dict, fds: list[int]) -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the server's handler, from the first instant
                self.listener.close()
                codestamp.note_checked(self.digest)  # found equal to the disk just now (see _handle)
                os.close(self.lock_fd)  # a long command must not keep the home's lock from a next server
                if self.zygote_fd is not None:
                    os.close(self.zygote_fd)  # nor keep the zygote after us
                code = Command(conn, msg, fds, cliproto.log_path(self.home)).run()
            except BaseException as e:
                log(f"served child failed: {type(e).__name__}: {e}")
            finally:
                os._exit(code)
        self.served += 1


# ---------------------------------------------------------------- a served command, in the child

class Command:
    def __init__(self, conn: socket.socket, msg: dict, fds: list[int], log_path: str) -> None:
        self.conn = conn
        self.msg = msg
        self.fds = fds
        self.log_path = log_path  # the server's log: where what runs after the reply says what went wrong
        self.done = False

    def run(self) -> int:
        try:
            self._become_caller()
        except Exception as e:
            log(f"could not take over the caller's process state: {type(e).__name__}: {e}")
            return 1
        try:
            cliproto.send(self.conn, {"pid": os.getpid()})
            self.conn.settimeout(REQUEST_TIMEOUT)
            go, _ = cliproto.recv(self.conn)
        except (OSError, cliproto.ProtocolError):
            return 1  # the launcher gave up before we began: it runs the command itself
        if not go.get("go"):
            return 1
        self.conn.settimeout(None)
        threading.Thread(target=self._watch_launcher, name="watch-launcher", daemon=True).start()
        from worktreebox.system import afterwards

        afterwards.serving()
        code = _run_cli()
        self.done = True
        with contextlib.suppress(OSError):
            cliproto.send(self.conn, {"exit": code})
        _after_reply(self.log_path)
        return code

    def _become_caller(self) -> None:
        """This process as the launcher would have been: its stdio, cwd, environment, umask, argv."""
        from worktreebox.system import procs

        os.setpgid(0, 0)  # a job of its own: the launcher sends a terminal's SIGINT to the whole group
        stdin, stdout, stderr, cwd = self.fds
        for target, fd in enumerate((stdin, stdout, stderr)):
            os.dup2(fd, target)
        os.fchdir(cwd)
        for fd in self.fds:
            if fd > 2:
                os.close(fd)
        os.environ.clear()
        os.environ.update(self.msg["env"])
        time.tzset()
        os.umask(int(self.msg["umask"]))
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGWINCH, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # what a fresh Python has
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        procs.act_for(int(self.msg["pid"]))
        sys.argv = [self.msg.get("argv0") or "wtbox", *self.msg["argv"]]
        main = types.ModuleType("__main__")  # click names the program from it (`wtbox`, `python -m ...`)
        main.__package__ = self.msg.get("main_package")
        sys.modules["__main__"] = main
        _fresh_stdio()

    def _watch_launcher(self) -> None:
        """The launcher sends nothing after go; end of file means it is gone (killed): so are we."""
        with contextlib.suppress(OSError):
            while self.conn.recv(64):
                pass
        if not self.done:
            os.kill(os.getpid(), signal.SIGKILL)


def _fresh_stdio() -> None:
    """sys.stdin/stdout/stderr over the new fds 0/1/2, buffered as Python buffers them at start-up
    (stdout line-buffered only on a terminal; stderr always)."""
    enc, err = sys.__stdout__.encoding if sys.__stdout__ else "utf-8", "strict"
    if os.environ.get("PYTHONIOENCODING"):
        enc, _, e = os.environ["PYTHONIOENCODING"].partition(":")
        err = e or err
    # the __std*__ too (typed Final): click and the crash handler fall back to them
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(  # type: ignore[misc]
        open(0, "rb", closefd=False), encoding=enc, errors=err)
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(  # type: ignore[misc]
        open(1, "wb", closefd=False), encoding=enc, errors=err, line_buffering=os.isatty(1))
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(  # type: ignore[misc]
        open(2, "wb", closefd=False), encoding=enc, errors="backslashreplace", line_buffering=True)


def _after_reply(log_path: str) -> None:
    """What the command asked to be done once its caller has the answer (system/afterwards.py), with
    the caller's terminal and pipes let go first (a caller reading our output to its end is not
    kept); what it says goes to the server's log."""
    from worktreebox.system import afterwards

    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        said = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        said = os.dup(devnull)
    for fd, to in ((0, devnull), (1, devnull), (2, said)):
        os.dup2(to, fd)
    os.close(devnull)
    os.close(said)
    try:
        afterwards.run_after_reply()
    except Exception as e:
        log(f"after the reply: {type(e).__name__}: {e}")
    with contextlib.suppress(Exception):
        sys.stderr.flush()


def _run_cli() -> int:
    """`worktreebox.cli.main.run()` and what Python does after a script: exit code, threads, atexit, flush."""
    from worktreebox.cli.main import run

    try:
        run()
        code = 0
    except SystemExit as e:
        code = _exit_code(e.code)
    except BaseException as e:
        with contextlib.suppress(Exception):
            import traceback

            traceback.print_exc()
        code = 130 if isinstance(e, KeyboardInterrupt) else 1
    with contextlib.suppress(Exception):
        threading._shutdown()  # type: ignore[attr-defined]  # non-daemon threads, as at interpreter exit
    with contextlib.suppress(Exception):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            code = code or 120
    return code


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    with contextlib.suppress(Exception):
        sys.stderr.write(f"{code}\n")
    return 1


if __name__ == "__main__":
    main()
