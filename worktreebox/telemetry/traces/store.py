"""The span store of a box: boxes/<id>/traces/spans.jsonl, append-only, rotated like logs.

One span per line, compact keys in a fixed order, so a query can test the hot fields on
the raw bytes before it pays for json.loads:

    {"s":<start ns>,"d":<duration ns>,"k":<status 0 unset|1 ok|2 error>,"t":"<trace id hex>",
     "i":"<span id hex>","p":"<parent span id hex or empty>","v":<service>,"n":<span name>,
     "r":<kind 0-5>,"a":{attributes}[,"m":<status message>][,"e":[{"n","s","a"} events]]}

Spans are appended in the order they arrive (the SDK exports a span when it ends), not in
start order. `public()` turns a record into the documented JSON shape of `wtbox traces --json`.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

NAME = "spans"
FILE = f"{NAME}.jsonl"
# 1 M typical spans are ~300 MB; four files of 100 MB keep about that many.
MAX_BYTES = 100 * 1024 * 1024
KEEP = 3

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False)
STATUS_NAMES = {0: "unset", 1: "ok", 2: "error"}
KIND_NAMES = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}
SERVICE_KEY = ',"v":'


def span_record(*, start_ns: int, end_ns: int, status: int, trace_id: str, span_id: str, parent_id: str,
                service: str, name: str, kind: int, attributes: dict[str, Any], status_message: str = "",
                events: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One stored span, keys in the order the raw-line filters of `query` rely on."""
    rec: dict[str, Any] = {"s": start_ns, "d": max(0, end_ns - start_ns), "k": status, "t": trace_id,
                           "i": span_id, "p": parent_id, "v": service, "n": name, "r": kind, "a": attributes}
    if status_message:
        rec["m"] = status_message
    if events:
        rec["e"] = events
    return rec


def encode(records: Iterable[dict[str, Any]], redact: Callable[[str], str] | None = None) -> bytes:
    """JSONL bytes of the records; `redact` is applied from the service on (ids stay intact)."""
    enc = _ENCODER.encode
    if redact is None:
        return "".join([enc(r) + "\n" for r in records]).encode("utf-8")
    out = []
    for r in records:
        line = enc(r)
        cut = line.find(SERVICE_KEY)
        out.append(line[:cut] + redact(line[cut:]) + "\n")
    return "".join(out).encode("utf-8")


class SpanWriter:
    """Appends encoded batches to traces/spans.jsonl with one write each; rotates at max_bytes."""

    def __init__(self, traces_dir: Path | str, max_bytes: int = MAX_BYTES, keep: int = KEEP) -> None:
        self.dir = Path(traces_dir)
        self.path = self.dir / FILE
        self.max_bytes, self.keep = max_bytes, keep
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._size = 0

    def write(self, data: bytes) -> None:
        if not data:
            return
        with self._lock:
            if self._fd is None:
                self.dir.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                self._size = os.fstat(self._fd).st_size
            if self._size and self._size + len(data) > self.max_bytes:
                from worktreebox.telemetry.logs.writer import rotate

                os.close(self._fd)
                rotate(self.path, self.keep)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                self._size = 0
            view = memoryview(data)
            while view:  # a regular file takes it all at once; loop for the rare short write
                n = os.write(self._fd, view)
                view = view[n:]
            self._size += len(data)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def files(traces_dir: Path | str) -> list[Path]:
    """The store's files, oldest first: spans.jsonl.N … .1, spans.jsonl."""
    from worktreebox.telemetry.logs.reader import _files

    return _files(Path(traces_dir), NAME)


def size(traces_dir: Path | str) -> int:
    total = 0
    for p in files(traces_dir):
        try:
            total += p.stat().st_size
        except OSError:
            pass
    return total


def iso_ns(ns: int) -> str:
    """RFC 3339 UTC with microseconds from nanoseconds since the epoch."""
    secs, rest = divmod(int(ns), 1_000_000_000)
    t = _dt.datetime.fromtimestamp(secs, _dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S") + f".{rest // 1000:06d}Z"


def public(rec: dict[str, Any]) -> dict[str, Any]:
    """A stored record in the shape `wtbox traces --json` documents."""
    out = {"trace_id": rec["t"], "span_id": rec["i"], "parent_span_id": rec["p"] or None, "name": rec["n"],
           "service": rec["v"], "start": iso_ns(rec["s"]), "duration_ms": round(rec["d"] / 1e6, 3),
           "status": STATUS_NAMES.get(rec["k"], "unset"), "kind": KIND_NAMES.get(rec.get("r", 0), "unspecified"),
           "attributes": rec.get("a") or {}}
    if rec.get("m"):
        out["status_message"] = rec["m"]
    if rec.get("e"):
        out["events"] = [{"name": e.get("n"), "time": iso_ns(e.get("s") or 0), "attributes": e.get("a") or {}}
                         for e in rec["e"]]
    return out
