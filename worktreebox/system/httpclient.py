"""The one HTTP client of wtbox: health checks and small GET/POSTs with a timeout.

HTTP/1.1 is spoken by h11 (a kept, pure-Python protocol library: ~2 MB and ~15 ms to import;
urllib costs ~8 MB of every supervisor's memory and ~20 ms, http.client ~6 MB, both for ssl and
email it then mostly does not use). One request per connection; `https://` is wrapped in the
standard library's ssl (imported only then). `unix_socket=` speaks to a daemon's socket (Docker).

Every failure to get an answer (refused, timed out, reset, not HTTP) is an OSError; an answer
with any status is a `Reply`. The timeout applies to each step (connect, send, each read), as
urllib's does.
"""
from __future__ import annotations

import dataclasses
import json
import socket
from typing import Any
from urllib.parse import urlsplit

import h11

MAX_BODY = 16 << 20  # a health check or an API answer; anything larger is not what we asked for
_READ = 65536


class HttpError(OSError):
    """No usable answer: the peer broke the protocol or sent more than we read."""


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def request(method: str, url: str, *, body: bytes = b"", headers: dict[str, str] | None = None,
            timeout: float = 2.0, unix_socket: str | None = None, read_body: bool = True) -> Reply:
    """One HTTP request; the reply whatever its status. `read_body=False` returns after the status
    and headers (a readiness check of an endpoint that streams)."""
    u = urlsplit(url)
    if u.scheme not in ("http", "https"):
        raise ValueError(f"not an http(s) URL: {url!r}")
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")
    head = [("Host", u.netloc or "localhost"), ("User-Agent", "wtbox"), ("Connection", "close"),
            *(headers or {}).items()]
    if body or method in ("POST", "PUT"):
        head.append(("Content-Length", str(len(body))))
    with _connect(u, timeout, unix_socket) as sock:
        conn = h11.Connection(h11.CLIENT)
        out = conn.send(h11.Request(method=method, target=target, headers=head))
        out += conn.send(h11.Data(data=body)) if body else b""
        sock.sendall(out + conn.send(h11.EndOfMessage()))
        return _reply(conn, sock, read_body)


def get(url: str, timeout: float = 2.0, **kw: Any) -> Reply:
    return request("GET", url, timeout=timeout, **kw)


def post(url: str, body: bytes, content_type: str, timeout: float = 2.0) -> Reply:
    return request("POST", url, body=body, headers={"Content-Type": content_type}, timeout=timeout)


def status(url: str, timeout: float = 1.0) -> int | None:
    """The status a GET of `url` answers, None when nothing answers (a health check)."""
    try:
        return request("GET", url, timeout=timeout, read_body=False).status
    except (OSError, ValueError):
        return None


def _connect(u: Any, timeout: float, unix_socket: str | None) -> socket.socket:
    if unix_socket is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(unix_socket)
        except OSError:
            sock.close()
            raise
        return sock
    port = u.port or (443 if u.scheme == "https" else 80)
    sock = socket.create_connection((u.hostname or "127.0.0.1", port), timeout=timeout)
    if u.scheme == "https":
        import ssl  # only for https: ~4 MB that plain checks never pay

        sock = ssl.create_default_context().wrap_socket(sock, server_hostname=u.hostname)
    return sock


def _reply(conn: h11.Connection, sock: socket.socket, read_body: bool) -> Reply:
    response: h11.Response | None = None
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(_READ))
            elif isinstance(event, h11.Response):
                response = event
                if not read_body:
                    break
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_BODY:
                    raise HttpError(f"an answer larger than {MAX_BODY} bytes")
                chunks.append(bytes(event.data))
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
    except h11.RemoteProtocolError as e:
        raise HttpError(f"not an HTTP answer ({e})") from None
    if response is None:
        raise HttpError("the server closed the connection without an answer")
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers}
    return Reply(response.status_code, headers, b"".join(chunks))
