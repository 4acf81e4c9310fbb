"""The one socket framing (system/unixsock.py) and the control socket that speaks it.

Socket pairs and a socket in tmp_path: real sockets, no wtbox process.
"""
from __future__ import annotations

import os
import socket
import struct
import threading
import time
import tracemalloc

import pytest

from worktreebox.services import control
from worktreebox.services.control import Request, Response
from worktreebox.system import unixsock


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    with a, b:
        yield a, b


@pytest.mark.parametrize("obj", [{}, {"op": "run", "argv": ["ls", "-l"]}, {"text": "é\n\0" * 1000},
                                 {"big": "x" * (3 << 20)}])
def test_a_message_round_trips(pair, obj):
    a, b = pair
    sender = threading.Thread(target=unixsock.send, args=(a, obj))  # a big one fills the buffer: send aside
    sender.start()
    assert unixsock.recv(b) == (obj, [])
    sender.join()


def test_descriptors_travel_with_the_message(pair, tmp_path):
    a, b = pair
    f = tmp_path / "f"
    f.write_text("shared")
    fd = os.open(f, os.O_RDONLY)
    try:
        unixsock.send(a, {"n": 1}, [fd, fd])
    finally:
        os.close(fd)
    msg, fds = unixsock.recv(b, max_fds=4)
    assert msg == {"n": 1} and len(fds) == 2
    assert os.read(fds[0], 10) == b"shared"
    for got in fds:
        os.close(got)


@pytest.mark.parametrize("raw, why", [
    (struct.pack("!I", 5) + b"[1,2]", "not an object"),
    (struct.pack("!I", 5) + b"{nope", "not JSON"),
    (struct.pack("!I", 10) + b"{}", "went away"),  # the sender closes in the middle of the body
    (b"\x00\x00", "went away"),  # ... or of the length
])
def test_what_is_not_a_message_is_one_error(pair, raw, why):
    a, b = pair
    a.sendall(raw)
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(unixsock.ProtocolError, match=why):
        unixsock.recv(b)


def test_a_closed_connection_is_told_apart(pair):
    a, b = pair
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(unixsock.Closed):
        unixsock.recv(b)


def test_an_endless_stream_is_refused_before_its_body_is_read(pair):
    """A peer that sends without end (a newline-less 'line', or a huge length) costs the reader
    its 4-byte header: the length is refused before anything of the body is read."""
    a, b = pair
    a.setblocking(False)
    sent = 0
    try:
        while True:  # fill the socket's buffer: an endless line, as far as the kernel takes it
            sent += a.send(b"x" * 65536)
    except BlockingIOError:
        pass
    with pytest.raises(unixsock.ProtocolError, match="more than the 1024"):
        unixsock.recv(b, limit=1024)
    b.setblocking(False)
    left = 0
    try:
        while True:
            left += len(b.recv(1 << 20))
    except BlockingIOError:
        pass
    assert sent > 100_000 and left == sent - 4


def test_a_message_within_the_limit_leaves_the_rest_unread(pair):
    a, b = pair
    unixsock.send(a, {"a": 1})
    a.sendall(b"trailing bytes that are not read")
    assert unixsock.recv(b, limit=64) == ({"a": 1}, [])


def test_paths_longer_than_sun_path_bind_and_connect(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = str(deep / "x.sock")
    assert len(path.encode()) > unixsock.SUN_PATH_MAX
    with socket.socket(socket.AF_UNIX) as srv, socket.socket(socket.AF_UNIX) as cli:
        unixsock.bind(srv, path)
        srv.listen(1)
        assert os.path.exists(path)
        unixsock.connect(cli, path)
        conn, _ = srv.accept()
        with conn:
            unixsock.send(cli, {"deep": True})
            assert unixsock.recv(conn)[0] == {"deep": True}


# ---------------------------------------------------------------- the control socket over it

@pytest.fixture
def control_server(tmp_path):
    run_dir = tmp_path / ("r" * 100)  # longer than sun_path, as a deep $WTBOX_HOME makes it
    run_dir.mkdir()
    seen: list[Request] = []

    def handle(req: Request) -> Response:
        seen.append(req)
        return Response(ok=True, error=f"did {req.cmd}")

    srv = control.serve(run_dir, handle, lambda req: None)
    yield run_dir, seen
    srv.close()


def test_control_request_and_answer(control_server):
    run_dir, seen = control_server
    assert control.request(run_dir, Request("status", "web"), timeout=5) == Response(ok=True, error="did status")
    assert seen == [Request("status", "web")]
    assert (run_dir / control.SOCKET).stat().st_mode & 0o777 == 0o600


def test_control_socket_does_not_grow_on_an_endless_line(control_server):
    """The old framing read up to a newline, without a bound: a client streaming 'x' forever grew the
    supervisor's memory by what it sent. Now the supervisor answers after the header and closes."""
    run_dir, seen = control_server
    tracemalloc.start()
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            unixsock.connect(s, str(run_dir / control.SOCKET))
            sent, t0 = 0, time.monotonic()
            with pytest.raises(OSError):  # the supervisor closed: EPIPE or ECONNRESET
                while time.monotonic() - t0 < 10:
                    sent += s.send(b"x" * 65536)
            assert sent < 50 << 20
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20
    assert seen == []  # nothing was taken for a request
    assert control.request(run_dir, Request("up"), timeout=5).ok  # and it still serves


def test_control_answers_garbage_with_one_sentence(control_server):
    run_dir, seen = control_server
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        unixsock.connect(s, str(run_dir / control.SOCKET))
        s.sendall(struct.pack("!I", 3) + b"[1]")
        answer = control.read_response(s)
    assert not answer.ok and answer.error == "not a request: a message that is not an object"
    assert seen == []
