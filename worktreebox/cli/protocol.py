"""What the CLI server serves and how the launcher and the server talk (launcher.py, cliserver.py).

Standard library only, and only cheap modules (`_socket`, not `socket`: its enums cost ~10 ms):
the launcher imports this on every `wtbox` call.

A message is a 4-byte big-endian length and that many bytes of JSON. File descriptors travel
as SCM_RIGHTS on the length, so they arrive with the first read of a message.

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
import json
import os
import struct
import sys

# Commands a server may run. Everything else runs in the launcher's own process: shell, exec,
# mcp, browse and pick need a controlling terminal or run long; gc, doctor, init and server are
# rare (and `server stop` must work on a broken server); unknown words get click's own error.
SERVED = frozenset({
    "new", "rm", "ls", "status", "env", "logs", "up", "down", "restart", "metrics", "probe", "traces",
    "top", "pool", "fanout", "compare", "keep", "unkeep", "db", "url",
})
_LONG_RUNNING = ("--watch", "--follow")  # top --watch, logs --follow: until Ctrl-C, job control wanted
_HELP = ("--help", "-h", "--version")

MAX_MESSAGE = 16 << 20
_HEADER = struct.Struct("!I")
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ProtocolError(Exception):
    """The other side sent something that is not a message, or went away in the middle of one."""


def served(args: list[str], stdin_is_tty: bool) -> bool:
    """Whether `wtbox <args>` may run in a server (see SERVED for why some never do)."""
    if not args or args[0] not in SERVED:
        return False
    options = args[1:args.index("--")] if "--" in args else args[1:]
    for a in options:
        if a in _HELP or a.split("=", 1)[0] in _LONG_RUNNING:
            return False
        if args[0] == "logs" and a.startswith("-") and not a.startswith("--") and "f" in a:
            return False  # -f, or -f inside a cluster of short flags
    if args[0] == "rm" and "--all" in options and "--yes" not in options and stdin_is_tty:
        return False  # it asks on the terminal
    return True


# ---------------------------------------------------------------- where

def run_dir(home: str) -> str:
    return os.path.join(home, "run")


def socket_path(home: str) -> str:
    return os.path.join(run_dir(home), "cli.sock")


def lock_path(home: str) -> str:
    return os.path.join(run_dir(home), "cli.lock")


def log_path(home: str) -> str:
    return os.path.join(run_dir(home), "cli.log")


def socket_fits(home: str) -> bool:
    """Whether the home's socket path fits in sun_path (108 bytes with its NUL): a home deeper
    than that is never served (no server is started for it, none is asked)."""
    return len(socket_path(home).encode()) < 108


def turned_off() -> bool:
    """WTBOX_NO_SERVER set (to anything but 0): every command runs in its own process."""
    return os.environ.get("WTBOX_NO_SERVER", "") not in ("", "0")


# ---------------------------------------------------------------- framing

def send(sock: _socket.socket, obj: dict, fds: list[int] = ()) -> None:
    body = json.dumps(obj, separators=(",", ":")).encode()
    head = _HEADER.pack(len(body))
    if fds:
        sent = sock.sendmsg([head], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
        head = head[sent:]
    sock.sendall(head + body)


def recv(sock: _socket.socket, max_fds: int = 0) -> tuple[dict, list[int]]:
    """One message and the descriptors that came with it (the caller owns and closes them)."""
    fds: list[int] = []
    if max_fds:
        head, ancillary, flags, _ = sock.recvmsg(_HEADER.size, _socket.CMSG_SPACE(max_fds * 4))
        for level, kind, data in ancillary:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                fds += struct.unpack(f"{len(data) // 4}i", data[:len(data) - len(data) % 4])
        if flags & getattr(_socket, "MSG_CTRUNC", 8):
            _close(fds)
            raise ProtocolError("too many file descriptors")
    else:
        head = sock.recv(_HEADER.size)
    try:
        head += _exactly(sock, _HEADER.size - len(head))
        (n,) = _HEADER.unpack(head)
        if n > MAX_MESSAGE:
            raise ProtocolError(f"a message of {n} bytes")
        obj = json.loads(_exactly(sock, n))
        if not isinstance(obj, dict):
            raise ProtocolError("a message that is not an object")
        return obj, fds
    except (ProtocolError, ValueError):
        _close(fds)
        raise ProtocolError("not a message") from None


def _exactly(sock: _socket.socket, n: int) -> bytes:
    chunks = []
    while n > 0:
        b = sock.recv(min(n, 1 << 20))
        if not b:
            raise ProtocolError("the other side went away")
        chunks.append(b)
        n -= len(b)
    return b"".join(chunks)


def _close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


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


def peer_uid(sock: _socket.socket) -> int:
    return _CRED.unpack(sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _CRED.size))[1]


# ---------------------------------------------------------------- the client side

def connect(home: str, timeout: float) -> _socket.socket | None:
    """A connection to this home's server, or None (none is running, or it is not ours)."""
    if not socket_fits(home):
        return None
    path = socket_path(home)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
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
