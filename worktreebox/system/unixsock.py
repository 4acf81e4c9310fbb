"""wtbox's unix sockets: one framing with bounded reads, and one answer to the path-length limit.

The CLI protocol (cli/protocol.py) and a supervisor's control socket (services/control.py)
speak it. A message is a 4-byte big-endian length and that many bytes of JSON, an object.
File descriptors travel as SCM_RIGHTS on the length, so they arrive with the first read of a
message. Reads are bounded: the length comes first, and one over the reader's `limit` is
refused before a byte of the body is read, so a peer that streams without end costs nothing.

A socket path may be longer than sun_path's 107 bytes (a deep $WTBOX_HOME): `bind` and
`connect` then go through a short path to the socket's directory (procfs.fd_path).

Standard library only, and only cheap modules (`_socket`, not `socket`: its enums cost ~10 ms):
the launcher imports this on every `wtbox` call.
"""
from __future__ import annotations

import _socket
import json
import os
import struct

from worktreebox.system import procfs

TYPE_CHECKING = False  # not typing's: importing typing costs the launcher ~5 ms
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

MAX_MESSAGE = 16 << 20
SUN_PATH_MAX = 107  # sun_path is 108 bytes with its NUL
_HEADER = struct.Struct("!I")
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ProtocolError(Exception):
    """The other side sent something that is not a message, or went away in the middle of one."""


class Closed(ProtocolError):
    """The other side closed the connection before it sent a message."""


# ---------------------------------------------------------------- framing

def send(sock: _socket.socket, obj: dict, fds: Sequence[int] = ()) -> None:
    body = json.dumps(obj, separators=(",", ":")).encode()
    head = _HEADER.pack(len(body))
    if fds:
        sent = sock.sendmsg([head], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
        head = head[sent:]
    sock.sendall(head + body)


def recv(sock: _socket.socket, max_fds: int = 0, limit: int = MAX_MESSAGE) -> tuple[dict, list[int]]:
    """One message and the descriptors that came with it (the caller owns and closes them)."""
    head, fds = _head(sock, max_fds)
    if not head:
        raise Closed("the other side closed the connection")
    try:
        head += _exactly(sock, _HEADER.size - len(head))
        (n,) = _HEADER.unpack(head)
        if n > limit:
            raise ProtocolError(f"a message of {n} bytes, more than the {limit} this side reads")
        obj = json.loads(_exactly(sock, n))
        if not isinstance(obj, dict):
            raise ProtocolError("a message that is not an object")
        return obj, fds
    except ValueError:
        _close(fds)
        raise ProtocolError("a message that is not JSON") from None
    except ProtocolError:
        _close(fds)
        raise


def _head(sock: _socket.socket, max_fds: int) -> tuple[bytes, list[int]]:
    """The first bytes of a message's length, and the descriptors sent with them."""
    if not max_fds:
        return sock.recv(_HEADER.size), []
    fds: list[int] = []
    head, ancillary, flags, _ = sock.recvmsg(_HEADER.size, _socket.CMSG_SPACE(max_fds * 4))
    for level, kind, data in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds += struct.unpack(f"{len(data) // 4}i", data[:len(data) - len(data) % 4])
    if flags & getattr(_socket, "MSG_CTRUNC", 8):
        _close(fds)
        raise ProtocolError("too many file descriptors")
    return head, fds


def _exactly(sock: _socket.socket, n: int) -> bytes:
    chunks = []
    while n > 0:
        b = sock.recv(min(n, 1 << 20))
        if not b:
            raise ProtocolError("the other side went away in the middle of a message")
        chunks.append(b)
        n -= len(b)
    return b"".join(chunks)


def _close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def peer_uid(sock: _socket.socket) -> int:
    return _CRED.unpack(sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _CRED.size))[1]


# ---------------------------------------------------------------- paths of any length

def bind(sock: _socket.socket, path: str) -> None:
    _at(path, sock.bind)


def connect(sock: _socket.socket, path: str) -> None:
    _at(path, sock.connect)


def listen(path: str, backlog: int = 64) -> tuple[Any, int]:
    """A listening socket at `path` (a socket.socket, close-on-exec) and the inode it has there:
    bound under a temporary name, then renamed over `path`, so a dead server's stale socket is
    replaced at once and a caller never finds no socket at all. (The CLI server, the zygote.)"""
    import socket  # not at import: the launcher imports this module and never listens

    tmp = f"{path}.{os.getpid()}"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    bind(s, tmp)
    s.listen(backlog)
    os.rename(tmp, path)
    return s, os.stat(path).st_ino


def withdraw(path: str, ino: int) -> None:
    """Remove the socket at `path` if it is still the one listen() made (inode `ino`): a successor's
    socket, renamed over ours meanwhile, stays."""
    try:
        if os.stat(path).st_ino == ino:
            os.unlink(path)
    except OSError:
        pass


def _at(path: str, call: Callable[[str], None]) -> None:
    """call(path), through the socket's directory when the path does not fit in sun_path."""
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        call(path)
        return
    folder, name = os.path.split(path)
    fd = os.open(folder or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        call(f"{procfs.fd_path(fd)}/{name}")
    finally:
        os.close(fd)
