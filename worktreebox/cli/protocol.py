"""What the CLI server serves and how the launcher and the server talk (launcher.py, cliserver.py).

Standard library only, and only cheap modules (`_socket`, not `socket`: its enums cost ~10 ms):
the launcher imports this on every `wtbox` call.

Messages are framed by `worktreebox.system.unixsock` (a length, then JSON; descriptors as
SCM_RIGHTS), as on a supervisor's control socket:

    launcher -> server   {"op": "run", "argv", "argv0", "main_package", "env", "umask", "cwd", "pid"}
                         + fds [stdin, stdout, stderr, cwd]
    server   -> launcher {"pid": <served child>}   or {"refused": "<why>"} (the launcher runs in process)
    launcher -> server   {"go": true}              (the child runs nothing before this)
    server   -> launcher {"exit": <code>}
    launcher -> server   {"op": "status"} -> {"pid", "since", "served", "home", "idle"}
                         {"op": "stop"}   -> {"stopping": true}
"""
from __future__ import annotations

import _socket
import os
import sys

from worktreebox import settings
from worktreebox.system.unixsock import MAX_MESSAGE, ProtocolError, bind, peer_uid, recv, send
from worktreebox.system.unixsock import connect as connect_path

__all__ = [
    "HELP",
    "MAX_MESSAGE",
    "SERVED",
    "ProtocolError",
    "ask",
    "bind",
    "connect",
    "connect_path",
    "install",
    "lock_path",
    "log_path",
    "peer_uid",
    "recv",
    "run_dir",
    "send",
    "served",
    "server_holds_lock",
    "socket_path",
    "turned_off",
]

# Commands a server may run. Everything else runs in the launcher's own process: shell, exec,
# mcp, browse and pick need a controlling terminal or run long; doctor, init and server are
# rare (and `server stop` must work on a broken server); unknown words get click's own error.
# gc is served: with hundreds of boxes its imports (psycopg, ...) were half of its second.
SERVED = frozenset({
    "new", "rm", "ls", "status", "env", "logs", "up", "down", "restart", "metrics", "probe", "traces",
    "top", "pool", "fanout", "compare", "diff", "keep", "unkeep", "db", "url", "snapshot", "restore", "fork",
    "gc",
    "net", "expose",
})
_LONG_RUNNING = ("--watch", "--follow")  # top --watch, logs --follow: until Ctrl-C, job control wanted
HELP = ("--help", "-h", "--version")


def served(args: list[str], stdin_is_tty: bool) -> bool:
    """Whether `wtbox <args>` may run in a server (see SERVED for why some never do)."""
    if not args or args[0] not in SERVED:
        return False
    options = args[1:args.index("--")] if "--" in args else args[1:]
    for a in options:
        if a in HELP or a.split("=", 1)[0] in _LONG_RUNNING:
            return False
        if args[0] == "logs" and a.startswith("-") and not a.startswith("--") and "f" in a:
            return False  # -f, or -f inside a cluster of short flags
    if args[0] == "db" and "psql" in options:
        return False  # it becomes psql on the terminal
    if args[0] == "db" and "dump" in options and len([a for a in options if not a.startswith("-")]) < 3:
        return False  # to stdout: a stream, not one reply
    asks = args[0] == "rm" and "--all" in options and "--yes" not in options and stdin_is_tty
    return not asks  # a question on the terminal is answered here, not through the server


# ---------------------------------------------------------------- where

def run_dir(home: str) -> str:
    return os.path.join(home, "run")


def socket_path(home: str) -> str:
    return os.path.join(run_dir(home), "cli.sock")


def lock_path(home: str) -> str:
    return os.path.join(run_dir(home), "cli.lock")


def log_path(home: str) -> str:
    return os.path.join(run_dir(home), "cli.log")


def turned_off() -> bool:
    """WTBOX_NO_SERVER set (to anything but 0): every command runs in its own process."""
    return settings.NO_SERVER.on()


def install() -> list[str]:
    """Which wtbox this is (its Python and its package directory): a server runs only its own
    install's commands, also when two installs share a home."""
    return [os.path.realpath(sys.executable), sys.prefix, os.path.dirname(os.path.abspath(__file__))]


def server_holds_lock(home: str) -> bool:
    """Whether a server (running or starting) holds this home's lock: then starting another is useless."""
    import fcntl

    try:
        fd = os.open(lock_path(home), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the client side

def connect(home: str, timeout: float) -> _socket.socket | None:
    """A connection to this home's server, or None (none is running, or it is not ours)."""
    path = socket_path(home)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        connect_path(sock, path)
        if peer_uid(sock) != os.getuid():
            raise PermissionError(path)
        return sock
    except OSError:
        sock.close()
        return None


def ask(home: str, op: str, timeout: float = 2.0) -> dict | None:
    """A control request (status, stop) to this home's server; None when no server answers."""
    sock = connect(home, timeout)
    if sock is None:
        return None
    try:
        send(sock, {"op": op})
        return recv(sock)[0]
    except (OSError, ProtocolError):
        return None
    finally:
        sock.close()
