"""The OTLP/HTTP endpoint of one box, served by the box's supervisor (`start`: threads of it).

Threads of the supervisor, not a process of their own: one wtbox process per box (issue 27: a
receiver process was 15.9 MB RSS / 9.1 MB PSS of every box). The supervisor runs for a box with
observability from its start phase on, services or not (tests run with `wtbox exec` still send
spans), and `down` stops the services, not the endpoint. Idle, it waits in accept(): no timer.
`python -m worktreebox.services.otlp_receiver BOX_DIR PORT [METRICS_URL]` runs one alone (the
traces benchmark measures it so).

POST /v1/traces  → spans appended to traces/spans.jsonl, durations into the span histogram
POST /v1/logs    → records in logs/_otlp.jsonl (service from the resource's service.name)
POST /v1/metrics → samples imported into the box's VictoriaMetrics
GET  /health     → 200

Bodies are application/x-protobuf or application/json (optionally gzip), as OTLP/HTTP
exporters send them. A body that is not a request of that signal gets a 400 with one sentence;
the process keeps serving. HTTP/1.1 itself (keep-alive, chunked bodies, 100-continue) is h11's.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h11

from worktreebox import settings

if TYPE_CHECKING:
    from worktreebox.telemetry.traces import store
    from worktreebox.telemetry.traces.spanmetrics import SpanMetrics

# The trace modules (OTLP decoding, the span store, the span histogram) are imported with the
# first request: an idle box's supervisor never needs them (1.8 MB of its RSS).

FLUSH_EVERY = 1.0  # seconds from the first new span to the push of the span histogram (no push without spans)
IDLE_TIMEOUT = 120.0  # a keep-alive connection that sends nothing this long is closed
MAX_HEADER = 64 * 1024
PATHS = {b"/v1/traces": "traces", b"/v1/logs": "logs", b"/v1/metrics": "metrics"}


class Secrets:
    """The redactor for what the box sends: secret values of the box env and the supervisor's
    --secret values (asked over its control socket whenever a new supervisor appears)."""

    RETRY_AFTER = 5.0

    def __init__(self, box_dir: Path, supervisor_secrets: Callable[[], dict[str, str]] | None = None) -> None:
        self.box_dir = box_dir
        self.in_process = supervisor_secrets  # a receiver inside the supervisor asks it directly
        self._key: Any = None
        self._redact: Callable[[str], str] | None = None
        self._lock = threading.Lock()

    def redactor(self) -> Callable[[str], str] | None:
        # In process the supervisor's secrets can change (its services came later): asked each time.
        pid_key = tuple(sorted(self.in_process().items())) if self.in_process \
            else _stat_key(self.box_dir / "run" / "supervisor.pid")
        key = (_stat_key(self.box_dir / "env"), pid_key)
        if key == self._key:
            return self._redact
        with self._lock:
            if key != self._key:
                self._rebuild(key)
        return self._redact

    def _rebuild(self, key: Any) -> None:
        from worktreebox.secrets import Redactor, secret_values
        from worktreebox.services.envfile import read_env_file

        values = secret_values(read_env_file(self.box_dir / "env"))
        supervisor_secrets = self._from_supervisor() if key[1] else {}
        if supervisor_secrets is None:
            key = None  # ask again with the next request (after RETRY_AFTER)
            supervisor_secrets = {}
        values += list(supervisor_secrets.values())
        # As they appear inside JSON strings too (quotes and backslashes escaped).
        values += [json.dumps(v, ensure_ascii=False)[1:-1] for v in values]
        r = Redactor(values)
        self._redact = r if r else None
        self._key = key

    def _from_supervisor(self) -> dict[str, str] | None:
        """The supervisor's secrets; None when it does not answer (it binds its socket just after
        writing its pid file, and starts services only after that)."""
        if self.in_process is not None:
            return dict(self.in_process())
        from worktreebox.services import control

        deadline = time.monotonic() + 1.0
        while True:
            try:
                answer = control.request(self.box_dir / "run", control.Request(control.ENV_SECRETS), timeout=2.0)
                return dict(answer.secrets or {})
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.02)


def _stat_key(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


class Receiver:
    """What the endpoint does with a decoded request; the HTTP layer is in Handler."""

    def __init__(self, box_dir: Path, box_id: str, metrics_url: str | None,
                 supervisor_secrets: Callable[[], dict[str, str]] | None = None,
                 wake_store: Callable[[], None] | None = None) -> None:
        self.box_dir, self.box_id, self.metrics_url = box_dir, box_id, metrics_url
        self._spans: store.SpanWriter | None = None  # made with the first span (see the imports)
        self._span_metrics: SpanMetrics | None = None
        self.secrets = Secrets(box_dir, supervisor_secrets)
        self._wake_store = wake_store
        self._logs: Any = None
        self._metric_converter: Any = None
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        self._spans_came = threading.Event()  # the flusher sleeps on it: an idle receiver wakes for nothing
        self._last_push_error: str | None = None
        self.counts = {"spans": 0, "rejected": 0, "refused": 0, "log_records": 0, "metric_samples": 0}

    def export(self, signal_name: str, body: bytes, encoding: str) -> bytes:
        """Decode and store one export request; the response body. Raises otlp.BadRequest."""
        from worktreebox.telemetry.traces import otlp, store

        req = otlp.parse_request(signal_name, body, encoding)
        rejected, why = 0, ""
        if signal_name == "traces":
            records, rejected = otlp.span_records(req)
            if records:
                spans, span_metrics = self._span_sinks()
                spans.write(store.encode(records, self.secrets.redactor()))
                span_metrics.observe(records)
                self._spans_came.set()
            why = "spans need a 16-byte trace id and an 8-byte span id" if rejected else ""
            self._count(spans=len(records), rejected=rejected)
        elif signal_name == "logs":
            self._write_logs(otlp.log_records(req))
        else:
            self.wake_store()
            rejected, why = self._import_metrics(req)
        return otlp.response(signal_name, encoding, rejected, why)

    def _span_sinks(self) -> tuple[store.SpanWriter, SpanMetrics]:
        from worktreebox.telemetry.traces import store
        from worktreebox.telemetry.traces.spanmetrics import SpanMetrics

        with self._lock:
            if self._spans is None or self._span_metrics is None:
                self._spans, self._span_metrics = store.SpanWriter(self.box_dir / "traces"), SpanMetrics(self.box_id)
            return self._spans, self._span_metrics

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                self.counts[k] += v

    def _write_logs(self, records: list[dict[str, Any]]) -> None:
        from worktreebox.telemetry.logs.record import OTLP
        from worktreebox.telemetry.logs.writer import LogWriter
        from worktreebox.telemetry.traces import store

        if self._logs is None:
            self._logs = LogWriter(self.box_dir / "logs", OTLP, self._redact_text)
        redact = self.secrets.redactor()
        for r in records:
            extra: dict[str, Any] = {"time": store.iso_ns(r["time_ns"]) if r["time_ns"] else None}
            for k in ("trace_id", "span_id"):
                if k in r:
                    extra[k] = r[k]
            if "attributes" in r:
                extra["attributes"] = _redact_values(r["attributes"], redact) if redact else r["attributes"]
            self._logs.write("otlp", r["level"], r["msg"], service=r["service"], **extra)
        self._count(log_records=len(records))

    def _redact_text(self, text: str) -> str:
        redact = self.secrets.redactor()
        return redact(text) if redact else text

    def _import_metrics(self, req: Any) -> tuple[int, str]:
        from worktreebox.errors import WtboxError
        from worktreebox.telemetry.traces import otlp
        from worktreebox.telemetry.vmclient import push_import_lines

        if self._metric_converter is None:
            self._metric_converter = otlp.MetricConverter(self.box_id)
        with self._lock:  # running totals of delta sums must see requests one at a time
            lines, skipped = self._metric_converter.lines(req)
        if lines:
            if not self.metrics_url:
                raise otlp.BadRequest("this box has no metrics store", 503)
            try:
                push_import_lines(self.metrics_url, lines)
            except (OSError, WtboxError) as e:
                raise otlp.BadRequest(f"the box's metrics store did not take the samples ({e})", 503) from None
        self._count(metric_samples=len(lines))
        return skipped, "exponential histograms are not stored" if skipped else ""

    # -- the span histogram, pushed by a background thread
    def flush_metrics(self) -> None:
        if not self.metrics_url:
            return
        from worktreebox.errors import WtboxError
        from worktreebox.telemetry.vmclient import push_prometheus

        if self._span_metrics is None:
            return  # no span came
        pending = self._span_metrics.pending(int(time.time() * 1000))
        if pending is None:
            return
        text, token = pending
        self.wake_store()
        try:
            push_prometheus(self.metrics_url, text)
        except (OSError, WtboxError) as e:
            self._log_once(f"pushing span metrics to {self.metrics_url} failed: {e}")
            self._spans_came.set()  # still dirty: the next flush sends the newer totals
            return
        self._span_metrics.committed(token)
        self._last_push_error = None

    def wake_store(self) -> None:
        """The box's store may sleep while the box is quiet (telemetry/store_sleep.py): the
        supervisor's StoreSleep starts it again."""
        if self._wake_store is not None:
            self._wake_store()

    def flusher(self) -> None:
        """Push the span histogram FLUSH_EVERY after spans came (batching what comes meanwhile)."""
        while True:
            self._spans_came.wait()
            if self.stopping.wait(FLUSH_EVERY):
                return
            self._spans_came.clear()
            self.flush_metrics()

    def _log_once(self, msg: str) -> None:
        if msg != self._last_push_error:
            self._last_push_error = msg
            print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {msg}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.stopping.set()
        self._spans_came.set()
        self.flush_metrics()
        if self._spans is not None:
            self._spans.close()
        if self._logs is not None:
            self._logs.close()


def _redact_values(obj: Any, redact: Callable[[str], str]) -> Any:
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: _redact_values(v, redact) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_redact_values(v, redact) for v in obj]
    return obj


# ---------------------------------------------------------------- HTTP
# h11 speaks the protocol (keep-alive, chunked bodies, 100-continue, malformed requests); this
# layer only moves bytes and routes. http.server would add ~4 MB and 40 ms of imports to every box.


class _TooLarge(Exception):
    pass


class Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(IDLE_TIMEOUT)
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER)
        try:
            while self._one_request(conn):
                conn.start_next_cycle()
        except h11.RemoteProtocolError as e:
            self._refuse(conn, e.error_status_hint, f"{e}\n".encode())
        except (OSError, h11.LocalProtocolError):
            pass  # the client went away: nothing to answer

    def _next(self, conn: h11.Connection) -> Any:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.receive_data(self.request.recv(65536))

    def _one_request(self, conn: h11.Connection) -> bool:
        """Serve one request; False when the connection should close."""
        req = self._next(conn)
        if not isinstance(req, h11.Request):
            return False  # the client closed the connection between requests
        from worktreebox.telemetry.traces.otlp import MAX_BODY

        headers = dict(req.headers)
        try:
            body = self._body(conn, req)
        except _TooLarge:
            self._refuse(conn, 413, f"the body is larger than {MAX_BODY // (1024 * 1024)} MiB\n".encode())
            return False
        path = req.target.split(b"?", 1)[0]
        status, ctype, out = self._route(req.method, path, headers, body)
        self._send(conn, status, ctype, out)
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    def _body(self, conn: h11.Connection, req: h11.Request) -> bytes:
        from worktreebox.telemetry.traces.otlp import MAX_BODY

        chunks: list[bytes] = []
        total = 0
        if int(dict(req.headers).get(b"content-length") or 0) > MAX_BODY:
            raise _TooLarge
        if conn.they_are_waiting_for_100_continue:  # curl asks before large bodies
            self.request.sendall(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        while True:
            event = self._next(conn)
            if isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            if not isinstance(event, h11.Data):
                raise h11.RemoteProtocolError("the body ended before it was whole", error_status_hint=400)
            total += len(event.data)
            if total > MAX_BODY:
                raise _TooLarge
            chunks.append(bytes(event.data))

    def _route(self, method: bytes, path: bytes, headers: dict[bytes, bytes], body: bytes) -> tuple[int, bytes, bytes]:
        receiver: Receiver = self.server.receiver  # type: ignore[attr-defined]
        if path in (b"/health", b"/"):
            if method not in (b"GET", b"HEAD"):
                return 405, b"text/plain", b"GET only\n"
            return 200, b"application/json", json.dumps({"ok": True, **receiver.counts}).encode()
        signal_name = PATHS.get(path.rstrip(b"/"))
        if signal_name is None:
            return 404, b"text/plain", b"not found: POST /v1/traces, /v1/logs or /v1/metrics\n"
        if method != b"POST":
            return 405, b"text/plain", b"POST only\n"
        from worktreebox.telemetry.traces import otlp

        ctype_in = headers.get(b"content-type", b"").decode("latin-1")
        try:
            encoding = otlp.encoding_of(ctype_in)
            data = otlp.decompress(body, headers.get(b"content-encoding", b"").decode("latin-1"))
            out = receiver.export(signal_name, data, encoding)
        except otlp.BadRequest as e:
            receiver._count(refused=1)
            return e.status, b"text/plain", (str(e) + "\n").encode()
        except Exception as e:
            receiver._count(refused=1)
            receiver._log_once(f"error on {path.decode(errors='replace')}: {type(e).__name__}: {e}")
            return 500, b"text/plain", f"the receiver failed: {type(e).__name__}\n".encode()
        return 200, b"application/x-protobuf" if encoding == "protobuf" else b"application/json", out

    def _send(self, conn: h11.Connection, status: int, ctype: bytes, body: bytes, close: bool = False) -> None:
        headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]
        if close:
            headers.append((b"connection", b"close"))
        out = conn.send(h11.Response(status_code=status, headers=headers, reason=HTTPStatus(status).phrase))
        self.request.sendall(out + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))

    def _refuse(self, conn: h11.Connection, status: int, body: bytes) -> None:
        """An error answer, then the connection closes (when an answer can still be sent at all)."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        try:
            self._send(conn, status, b"text/plain", body, close=True)
        except (OSError, h11.LocalProtocolError):
            pass


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, port: int, receiver: Receiver) -> None:
        self.receiver = receiver
        super().__init__(("127.0.0.1", port), Handler)


class Running:
    """A receiver serving in threads of this process (the supervisor's)."""

    def __init__(self, server: Server, receiver: Receiver, port: int) -> None:
        self.server, self.receiver, self.port = server, receiver, port
        self.thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": None},
                                       name="otlp", daemon=True)
        self.flusher = threading.Thread(target=receiver.flusher, daemon=True, name="span-metrics")

    def stop(self) -> None:
        """Stop serving and push the last span counts."""
        _shut_down(self.server, self.port)
        self.receiver.close()
        self.server.server_close()


def start(box_dir: Path, box_id: str, port: int, metrics_url: str | None, *,
          supervisor_secrets: Callable[[], dict[str, str]] | None = None,
          wake_store: Callable[[], None] | None = None) -> Running:
    """Serve the box's endpoint on 127.0.0.1:`port` in threads of this process; OSError when the
    port cannot be bound."""
    receiver = Receiver(box_dir, box_id, metrics_url, supervisor_secrets, wake_store)
    running = Running(Server(port, receiver), receiver, port)
    running.thread.start()
    running.flusher.start()
    return running


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (2, 3):
        print("usage: python -m worktreebox.services.otlp_receiver BOX_DIR PORT [METRICS_URL]", file=sys.stderr)
        return 2
    box_dir, port = Path(argv[0]).absolute(), int(argv[1])
    metrics_url = argv[2] if len(argv) == 3 and argv[2] else None
    box_id = settings.BOX_ID.value() or box_dir.name
    os.chdir(box_dir)  # rm's sweep by cwd finds it too
    receiver = Receiver(box_dir, box_id, metrics_url)
    try:
        server = Server(port, receiver)
    except OSError as e:
        print(f"cannot listen on 127.0.0.1:{port}: {e}", file=sys.stderr, flush=True)
        return 1

    def on_term(signum: int, frame: Any) -> None:
        threading.Thread(target=_shut_down, args=(server, port), daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    threading.Thread(target=receiver.flusher, daemon=True, name="span-metrics").start()
    try:
        # None: the selector waits without a timeout (typeshed says float; socketserver passes it on as is)
        server.serve_forever(poll_interval=None)  # type: ignore[arg-type]  # woken by connections only
    finally:
        receiver.close()
        server.server_close()
    return 0


def _shut_down(server: Server, port: int) -> None:
    """End serve_forever: it waits in select without a timeout (an idle receiver wakes for
    nothing), so a connection of our own wakes it to see the request."""
    done = threading.Thread(target=server.shutdown, daemon=True)
    done.start()
    while done.is_alive():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            pass
        done.join(0.05)


if __name__ == "__main__":
    sys.exit(main())
