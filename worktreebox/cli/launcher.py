"""The `wtbox` command: hand the command to this home's CLI server (cliserver.py), else run it here.

A served command skips Python's start-up and wtbox's imports (psycopg alone is 120-450 ms): the
server has them loaded and forks a child per command. This module therefore imports only cheap
standard-library modules; `worktreebox.cli.main` is imported only when the command runs here.

It runs here, and always correctly, when: the command is never served (cliproto.served), no
server answers (none yet, a stale socket, a server that refuses because wtbox's code changed),
WTBOX_NO_SERVER=1, or the caller is inside a box (WTBOX_ID set). Inside a sandboxed box
(WTBOX_BOX_SOCKET set) a command goes to the box's supervisor instead (services/endpoint.py:
`logs`, `metrics`, `traces`, `probe`, `browse`, `status`, `restart` for this box only). After a served command ran here
because no server answered, a server is started detached for the next call if the home exists
by then (the first `wtbox new` of a new home makes it); before a home exists nothing is made.
"""
from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # the C module under `signal`, which imports enum first (~9 ms of the window this closes)
import _socket  # (loaded anyway: system/unixsock)
import os
import sys


def _interrupted_while_loading(signum: int, frame: object) -> None:
    """Ctrl-C while wtbox is still importing: nothing has started, so one line and 130, not a traceback."""
    os.write(2, b"wtbox: interrupted.\n")
    os._exit(130)


# Until main() hands Ctrl-C back to Python (KeyboardInterrupt: the commands' rollbacks) once loaded.
_signal.signal(_signal.SIGINT, _interrupted_while_loading)

import signal  # noqa: E402 (after the handler: these imports are the window)

from worktreebox import settings  # noqa: E402
from worktreebox.cli import protocol as cliproto  # noqa: E402
from worktreebox.settings import default_home  # noqa: E402
from worktreebox.system import procfs  # noqa: E402

CONNECT_TIMEOUT = 1.0
# A server binds its socket before it preloads (~1 s), so a call that arrives meanwhile waits in
# the backlog instead of starting a second server; past this, the command runs here.
ANSWER_TIMEOUT = 10.0
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGWINCH)
_TO_GROUP = (signal.SIGINT, signal.SIGQUIT, signal.SIGWINCH)  # what a terminal sends to a whole job
# What the server's own environment keeps (each request brings its full environment; the
# server's environment, as the kernel shows it to others, should not show whatever secrets the first caller had).
_SERVER_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "VIRTUAL_ENV",
               "XDG_STATE_HOME", settings.HOME.name, settings.SERVER_IDLE.name)


def main() -> None:
    args = sys.argv[1:]
    endpoint = settings.BOX_SOCKET.value()
    if endpoint and settings.BOX_ID.value() and args and args[0] not in cliproto.HELP:
        sys.exit(via_box(endpoint, args))
    home = os.path.abspath(default_home())
    wanted = not _off() and cliproto.served(args, _isatty(0))
    if wanted:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            code = serve(home, args)
        except KeyboardInterrupt:  # before the command started anywhere
            os.write(2, b"wtbox: interrupted.\n")
            sys.exit(130)
        if code is not None:
            sys.exit(code)
    try:
        signal.signal(signal.SIGINT, _interrupted_while_loading)  # a refused serve restored Python's
        from worktreebox.cli.main import run

        signal.signal(signal.SIGINT, signal.default_int_handler)
        run()
    finally:
        if wanted:
            try:
                start_server(home)
            except KeyboardInterrupt:  # the command is done; a server for the next one can wait
                pass


def via_box(endpoint: str, args: list[str]) -> int:
    """Run `wtbox <args>` through the box's endpoint with our stdin, stdout and stderr; its exit code."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        _connect_starting(sock, endpoint)
        cliproto.send(sock, {"op": "run", "argv": args, "env": dict(os.environ)}, [0, 1, 2])
        signal.signal(signal.SIGINT, lambda *_: os._exit(130))  # our end closes: the command is stopped
        reply, _ = cliproto.recv(sock)
    except (OSError, cliproto.ProtocolError) as e:
        os.write(2, f"wtbox: this box's supervisor does not answer ({e}); run 'wtbox up' from the host.\n".encode())
        return 1
    finally:
        sock.close()
    if "refused" in reply:
        os.write(2, f"wtbox: {reply['refused']}\n".encode())
        return 2
    code = reply.get("exit")
    return code if isinstance(code, int) else 1


ENDPOINT_START = 10.0  # seconds: a box is returned while its supervisor may still start (resources/sandbox.py)


def _connect_starting(sock: _socket.socket, endpoint: str) -> None:
    """Connect to the box's endpoint; one not there yet (a box just made, its supervisor still starting:
    it binds the socket once up) is waited for, ENDPOINT_START at most."""
    import time

    deadline = time.monotonic() + ENDPOINT_START
    while True:
        try:
            cliproto.connect_path(sock, endpoint)
            return
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _off() -> bool:
    """No server for this call: turned off, or the caller is inside a box (a server started from
    there would live in the box's cgroup and die with it)."""
    return cliproto.turned_off() or bool(settings.BOX_ID.value())


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def serve(home: str, args: list[str]) -> int | None:
    """Run `wtbox <args>` in the server; its exit code, or None when no server took it (run it here)."""
    sock = cliproto.connect(home, CONNECT_TIMEOUT)
    if sock is None:
        return None
    try:
        child = _hand_over(sock, args)
        if child is None:
            return None
        return _wait(sock, child)
    finally:
        sock.close()


def _hand_over(sock, args: list[str]) -> int | None:
    """Send the request; the served child's pid once it waits for our go, else None."""
    try:
        cwd_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            cwd = os.getcwd()
        except OSError:  # a deleted directory: the fd still works, the path does not
            cwd = ""
        umask = os.umask(0o022)
        os.umask(umask)
        main = sys.modules.get("__main__")
        request = {"op": "run", "argv": args, "argv0": sys.argv[0], "main_package": getattr(main, "__package__", None),
                   "env": dict(os.environ), "umask": umask, "cwd": cwd, "pid": os.getpid(),
                   "install": cliproto.install()}
        sock.settimeout(ANSWER_TIMEOUT)
        cliproto.send(sock, request, [0, 1, 2, cwd_fd])
        reply, _ = cliproto.recv(sock)
    except (OSError, cliproto.ProtocolError):
        return None
    finally:
        os.close(cwd_fd)
    child = reply.get("pid")
    return child if isinstance(child, int) and child > 1 else None


def _wait(sock, child: int) -> int | None:
    """Forward signals to the child and wait for its exit code (None: it never started; run it here)."""
    got: list[int] = []

    def forward(sig: int, _frame) -> None:
        got.append(sig)
        try:
            if sig in _TO_GROUP:
                os.killpg(child, sig)  # the child leads its own group, as a job started from a shell does
            else:
                os.kill(child, sig)
        except OSError:
            pass

    before = {sig: signal.signal(sig, forward) for sig in _FORWARDED}
    try:
        sock.settimeout(None)
        cliproto.send(sock, {"go": True})
    except OSError:
        if got:
            return 128 + got[-1]
        for sig, handler in before.items():
            signal.signal(sig, handler)
        return None
    try:
        reply, _ = cliproto.recv(sock)
        code = reply.get("exit")
        return code if isinstance(code, int) else 1
    except (OSError, cliproto.ProtocolError):
        if got:  # killed by what we forwarded, as an in-process wtbox would have been
            return 128 + got[-1]
        os.write(2, b"wtbox: the command ended without an exit status (its CLI server process died; "
                    b"see run/cli.log in the wtbox home, or set WTBOX_NO_SERVER=1).\n")
        return 1


def start_server(home: str) -> None:
    """Start this home's CLI server, detached, without waiting for it (one per home: the server
    takes a lock and leaves at once if another holds it)."""
    if not os.path.isdir(home) or _in_box_cgroup() or cliproto.server_holds_lock(home):
        return
    env = {k: v for k, v in os.environ.items() if k in _SERVER_ENV or k.startswith(("LC_", "PYTHON"))}
    env["WTBOX_HOME"] = home
    null = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]
    try:
        # -P: the caller's cwd must not shadow the installed package; own session: no terminal
        os.posix_spawn(sys.executable, [sys.executable, "-P", "-m", "worktreebox.cli.server", home], env,
                       file_actions=null, setsid=True)
    except OSError:
        pass  # no server this time; the command itself already ran


def _in_box_cgroup() -> bool:
    """Whether we run inside a box's cgroup (a box process that dropped WTBOX_ID): a server started
    here would be killed with that box."""
    return "/wtbox-" in procfs.own_cgroup()


if __name__ == "__main__":
    main()
