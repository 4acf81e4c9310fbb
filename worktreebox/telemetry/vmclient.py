"""Speaking to a VictoriaMetrics over HTTP: health, push and query (whichever provider runs it).

Plain urllib (imported when used) so that the CLI needs no HTTP library and starts fast; the
supervisor's pushes and the health poll use a bare socket, because urllib drags in ssl and
email (~6 MB per box).
"""
from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterable
from typing import Any

from worktreebox.errors import UsageError, WtboxError


def healthy(url: str, timeout: float = 1.0) -> bool:
    """GET /health answers 200. A bare socket: polled during `new`, where importing urllib
    (ssl, email, http.client) would cost more than VictoriaMetrics takes to start."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 80), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
            head = s.recv(32)
    except OSError:
        return False
    return head.split(b" ", 2)[1:2] == [b"200"]


def push_prometheus(url: str, text: str, timeout: float = 2.0) -> None:
    """POST Prometheus text to <url>/api/v1/import/prometheus over a bare socket (plain http only)."""
    _push(url, "/api/v1/import/prometheus", text.encode(), "text/plain", timeout)


def push_import_lines(url: str, lines: Iterable[dict[str, Any]], timeout: float = 2.0) -> None:
    """POST JSON lines ({"metric", "values", "timestamps"}) to <url>/api/v1/import over a bare socket."""
    body = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines).encode()
    _push(url, "/api/v1/import", body, "application/json", timeout)


def _push(url: str, path: str, body: bytes, content_type: str, timeout: float) -> None:
    from urllib.parse import urlsplit  # urllib.parse alone is light

    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    head = (f"POST {u.path.rstrip('/')}{path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(head.encode() + body)
        status = s.recv(64).split(b" ", 2)
    if len(status) < 2 or not status[1].startswith(b"2"):
        why = b" ".join(status[1:]).decode(errors="replace").strip() or "no answer"
        raise WtboxError(f"VictoriaMetrics at {url} refused the push ({why}).")


class Client:
    """Query and push helpers for one VictoriaMetrics (instant/range query, names, import)."""

    def __init__(self, url: str, timeout: float = 10.0, box_id: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.box_id = box_id

    # -- reading
    def query(self, query: str, at: float | None = None) -> dict[str, Any]:
        """Instant query; returns the `data` object ({resultType, result})."""
        # An explicit millisecond time: without it VictoriaMetrics rounds "now" down to the second
        # and hides samples pushed within that second.
        at = time.time() if at is None else at
        params = {"query": query, "time": f"{at:.3f}", "nocache": "1"}
        return self._api("/api/v1/query", params)

    def query_range(self, query: str, start: float, end: float, step: float) -> dict[str, Any]:
        params = {"query": query, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}s", "nocache": "1"}
        return self._api("/api/v1/query_range", params)

    def metric_names(self) -> list[str]:
        return sorted(self._api("/api/v1/label/__name__/values", {}))

    # -- writing
    def push_prometheus(self, text: str) -> None:
        """Push Prometheus text exposition through /api/v1/import/prometheus."""
        self._post("/api/v1/import/prometheus", text.encode())

    def push_jsonl(self, lines: Iterable[dict[str, Any]]) -> None:
        """Push JSON lines ({"metric": {...}, "values": [...], "timestamps": [...]}) through /api/v1/import."""
        body = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines)
        self._post("/api/v1/import", body.encode())

    def flush(self) -> None:
        """Make everything pushed so far searchable now (instead of within ~1 s)."""
        self._post("/internal/force_flush", b"", method="GET")

    # -- plumbing
    def _post(self, path: str, body: bytes, method: str = "POST") -> None:
        import urllib.error
        import urllib.request

        req = urllib.request.Request(self.url + path, data=body if method == "POST" else None, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                r.read()
        except urllib.error.HTTPError as e:
            raise WtboxError(f"{self._who()} rejected {path}: {_error_text(e)}.") from None
        except OSError as e:
            raise self._down(e) from None

    def _api(self, path: str, params: dict[str, str]) -> Any:
        import urllib.error
        import urllib.parse
        import urllib.request

        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as r:
                doc = json.load(r)
        except urllib.error.HTTPError as e:
            # 400/422: the query itself is wrong, a user mistake (exit 2).
            if e.code in (400, 422):
                raise UsageError(f"The query was rejected: {_error_text(e)}.") from None
            raise WtboxError(f"{self._who()} answered {e.code} to {path}: {_error_text(e)}.") from None
        except OSError as e:
            raise self._down(e) from None
        if doc.get("status") != "success":
            raise UsageError(f"The query was rejected: {doc.get('error', doc)}.")
        return doc["data"]

    def _who(self) -> str:
        if self.box_id:
            return f"The metrics store of box {self.box_id} ({self.url})"
        return f"VictoriaMetrics at {self.url}"

    def _down(self, e: OSError) -> WtboxError:
        reason = getattr(e, "reason", e)
        return WtboxError(f"{self._who()} is not reachable ({reason}); is the box running?")


def _error_text(e) -> str:
    try:
        body = e.read().decode(errors="replace")
    except OSError:
        body = ""
    try:
        msg = json.loads(body).get("error") or body
    except ValueError:
        msg = body
    msg = " ".join(str(msg).split()).rstrip(".")
    return msg[:400] or f"HTTP {e.code}"
