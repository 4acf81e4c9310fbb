"""Speaking to a VictoriaMetrics over HTTP: health, push and query (whichever provider runs it).

Through the one HTTP client (system/httpclient.py): it is light enough for the supervisor's
pushes and the health polls of `new`, where urllib (ssl, email) would cost more memory than
the rest of the supervisor and more time than VictoriaMetrics takes to start.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlencode

from worktreebox.errors import UsageError, WtboxError
from worktreebox.system import httpclient


def healthy(url: str, timeout: float = 1.0) -> bool:
    """GET /health answers 200."""
    return httpclient.status(url.rstrip("/") + "/health", timeout) == 200


def push_prometheus(url: str, text: str, timeout: float = 2.0) -> None:
    """POST Prometheus text to <url>/api/v1/import/prometheus."""
    _push(url, "/api/v1/import/prometheus", text.encode(), "text/plain", timeout)


def push_import_lines(url: str, lines: Iterable[dict[str, Any]], timeout: float = 2.0) -> None:
    """POST JSON lines ({"metric", "values", "timestamps"}) to <url>/api/v1/import."""
    body = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines).encode()
    _push(url, "/api/v1/import", body, "application/json", timeout)


def _push(url: str, path: str, body: bytes, content_type: str, timeout: float) -> None:
    reply = httpclient.post(url.rstrip("/") + path, body, content_type, timeout)
    if not 200 <= reply.status < 300:
        why = f"{reply.status} {_error_text(reply)}".strip()
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
        try:
            reply = httpclient.request(method, self.url + path, body=body, timeout=self.timeout)
        except OSError as e:
            raise self._down(e) from None
        if reply.status >= 400:
            raise WtboxError(f"{self._who()} rejected {path}: {_error_text(reply)}.")

    def _api(self, path: str, params: dict[str, str]) -> Any:
        try:
            reply = httpclient.get(f"{self.url}{path}?{urlencode(params)}", timeout=self.timeout)
        except OSError as e:
            raise self._down(e) from None
        if reply.status >= 400:
            # 400/422: the query itself is wrong, a user mistake (exit 2).
            if reply.status in (400, 422):
                raise UsageError(f"The query was rejected: {_error_text(reply)}.")
            raise WtboxError(f"{self._who()} answered {reply.status} to {path}: {_error_text(reply)}.")
        try:
            doc = reply.json()
        except ValueError:
            raise WtboxError(f"{self._who()} answered {path} with something that is not JSON.") from None
        if doc.get("status") != "success":
            raise UsageError(f"The query was rejected: {doc.get('error', doc)}.")
        return doc["data"]

    def _who(self) -> str:
        if self.box_id:
            return f"The metrics store of box {self.box_id} ({self.url})"
        return f"VictoriaMetrics at {self.url}"

    def _down(self, e: OSError) -> WtboxError:
        return WtboxError(f"{self._who()} is not reachable ({e}); is the box running?")


def _error_text(reply: httpclient.Reply) -> str:
    body = reply.text()
    try:
        msg = json.loads(body).get("error") or body
    except (ValueError, AttributeError):
        msg = body
    msg = " ".join(str(msg).split()).rstrip(".")
    return msg[:400] or f"HTTP {reply.status}"
