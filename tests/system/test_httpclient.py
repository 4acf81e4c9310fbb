"""The one HTTP client (system/httpclient.py) against real servers: TCP and a unix socket, answers
of every shape, and peers that are not HTTP servers at all."""
from __future__ import annotations

import http.server
import os
import socket
import socketserver
import threading

import pytest

from worktreebox.system import httpclient


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"one ", b"two"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            return
        first = self.path.strip("/").split("?")[0]
        code = int(first) if first.isdigit() else 200
        self._answer(code, f"{self.path} {self.headers.get('User-Agent')}".encode())

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self._answer(201, self.headers["Content-Type"].encode() + b" " + body)

    def _answer(self, code, body):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Kind", "test")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def url():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_get_answers_any_status(url):
    for code in (200, 404, 500):
        reply = httpclient.get(f"{url}/{code}?x=1")
        assert reply.status == code and reply.text() == f"/{code}?x=1 wtbox" and reply.headers["x-kind"] == "test"


def test_chunked_answer(url):
    assert httpclient.get(f"{url}/chunked").body == b"one two"


def test_post(url):
    reply = httpclient.post(f"{url}/", b'{"a": 1}', "application/json")
    assert reply.status == 201 and reply.body == b'application/json {"a": 1}'


def test_status_is_none_when_nothing_answers():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert httpclient.status(f"http://127.0.0.1:{port}/") is None
    with pytest.raises(OSError):
        httpclient.get(f"http://127.0.0.1:{port}/")


@pytest.mark.parametrize("answer", [b"SSH-2.0-OpenSSH_9.2\r\n", b"",
                                    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"])
def test_a_peer_that_is_not_an_http_server_is_an_oserror(answer):
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()

        def serve():
            conn, _ = srv.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(answer)

        threading.Thread(target=serve, daemon=True).start()
        with pytest.raises(OSError):
            httpclient.get(f"http://127.0.0.1:{srv.getsockname()[1]}/", timeout=2)


def test_a_server_that_never_answers_times_out():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()  # accepts into the backlog, never answers
        with pytest.raises(TimeoutError):
            httpclient.get(f"http://127.0.0.1:{srv.getsockname()[1]}/", timeout=0.3)


def test_over_a_unix_socket(tmp_path):
    path = str(tmp_path / "daemon.sock")

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    class UnixHandler(Handler):
        def address_string(self):
            return "unix"

    srv = Server(path, UnixHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        reply = httpclient.get("http://docker/_ping", unix_socket=path)
        assert reply.status == 200 and reply.text() == "/_ping wtbox"
    finally:
        srv.shutdown()
        srv.server_close()
        os.unlink(path)


def test_read_body_false_returns_at_the_head(url):
    reply = httpclient.request("GET", f"{url}/200", read_body=False)
    assert reply.status == 200 and reply.body == b""


@pytest.mark.parametrize("bad", ["ftp://x/", "127.0.0.1:80", "/health"])
def test_only_http_urls(bad):
    with pytest.raises(ValueError):
        httpclient.get(bad)
