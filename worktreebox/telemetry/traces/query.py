"""Queries over a box's span store: the plain functions `wtbox traces` renders (and agents call).

    find_spans(box_dir, min_duration="200ms", service="web")  → [span, ...]  (newest `limit`)
    trace_tree(box_dir, trace_id)                             → {"trace_id", "spans": [... with depth]}
    trace_logs(box_dir, trace_id)                             → log records carrying that trace id

Fast on large stores the way `wtbox logs` is: the most selective filter is searched over whole
4 MB chunks of raw bytes (a regex for "start >= X, duration >= Y" on the fixed leading keys, or
a literal for the trace id, status or service), and json.loads runs only on the lines it finds.
Without filters the newest spans are read backwards from the end, so the cost is the limit's.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from worktreebox.errors import NotFound, UsageError
from worktreebox.telemetry.traces import store

DEFAULT_LIMIT = 100
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s|m|h)\s*$")
_UNIT_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000, "m": 60_000_000_000,
            "h": 3_600_000_000_000}
_STATUS_CODES = {"unset": 0, "ok": 1, "error": 2}
_TRACE_ID = re.compile(r"^[0-9a-f]{8,32}$")


# ---------------------------------------------------------------- arguments


def duration_ns(value: str | float | int | None, where: str = "--min-duration") -> int | None:
    """'200ms', '1.5s', '500us' → nanoseconds; a number is taken as seconds."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value * 1_000_000_000)
    m = _DURATION.match(str(value))
    if not m:
        raise UsageError(f"{where}: expected a duration with a unit such as 200ms, 1.5s or 500us, got {value!r}.")
    return int(float(m.group(1)) * _UNIT_NS[m.group(2)])


def time_ns(value: str | float | int | None, where: str = "--since") -> int | None:
    """'5m' (ago), an ISO time, or epoch seconds → nanoseconds since the epoch."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value * 1_000_000_000)
    import datetime as dt

    from worktreebox.telemetry.logs.reader import parse_time

    try:
        text = parse_time(str(value))
    except UsageError:
        raise UsageError(f"{where}: cannot read {value!r}; use a duration ago such as 5m or an ISO time.") from None
    d = dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    return int(d.timestamp()) * 1_000_000_000 + d.microsecond * 1000


def status_code(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    code = _STATUS_CODES.get(str(value).lower())
    if code is None:
        raise UsageError(f"--status: expected one of error, ok, unset, got {value!r}.")
    return code


def trace_id_of(value: str) -> str:
    tid = str(value).strip().lower()
    if not _TRACE_ID.match(tid):
        raise UsageError(f"{value!r} is not a trace id; give its 32 hex digits (or at least the first 8).")
    return tid


# ---------------------------------------------------------------- matching


def ge_pattern(n: int) -> bytes:
    """A regex for the decimal integers >= n (no leading zeros, as JSON writes them)."""
    if n <= 0:
        return rb"\d+"
    s = str(n).encode()
    width = len(s)
    alts = [rb"[1-9]\d{%d,}" % width]  # more digits
    for i in range(width):
        nxt = s[i] - ord("0") + 1
        if nxt > 9:
            continue
        rest = width - i - 1
        alts.append(re.escape(s[:i]) + b"[%d-9]" % nxt + (rb"\d{%d}" % rest if rest else b""))
    alts.append(s)
    # The lookahead rejects numbers with too few digits before trying the alternatives: twice as fast.
    return b"(?=\\d{%d})(?:" % width + b"|".join(alts) + b")"


class SpanFilter:
    """Every filter of a query, checked first on the raw line, then on the parsed record."""

    def __init__(self, *, service: str | None = None, name: str | None = None, min_duration: Any = None,
                 status: str | None = None, since: Any = None, trace_id: str | None = None) -> None:
        self.service = service or None
        self.name_rx = re.compile(fnmatch.translate(name)) if name else None
        self.min_ns = duration_ns(min_duration)
        self.status = status_code(status)
        self.since_ns = time_ns(since)
        self.trace = trace_id_of(trace_id) if trace_id else None
        self.literals: list[bytes] = []  # every one must be in a matching line
        if self.trace:
            self.literals.append(b'"t":"' + self.trace.encode())
        if self.status is not None:
            self.literals.append(b',"k":%d,' % self.status)
        if self.service:
            self.literals.append(store.SERVICE_KEY.encode() + json.dumps(self.service, ensure_ascii=False).encode()
                                 + b',"n":')
        self.rx = None
        self.rx_at_line_start = False
        if self.since_ns:
            self.rx = re.compile(rb'\{"s":' + ge_pattern(self.since_ns) + rb',"d":' + ge_pattern(self.min_ns or 0)
                                 + rb",")
            self.rx_at_line_start = True
        elif self.min_ns:
            # Unanchored: a "d" key inside the attributes may match too; matches() then rejects the line.
            self.rx = re.compile(rb',"d":' + ge_pattern(self.min_ns) + rb",")

    def candidates(self, buf: bytes | bytearray, start: int = 0, end: int | None = None) -> list[bytes | bytearray]:
        """Lines of buf[start:end] (whole lines) that may match, in file order."""
        end = len(buf) if end is None else end
        lits = self.literals
        if self.rx is None and not lits:
            return [line for line in buf[start:end].split(b"\n") if line]
        out = []
        pos = start
        rx = self.rx
        first = lits[0] if lits else b""
        while pos < end:
            if rx is not None:
                m = rx.search(buf, pos, end)
                if m is None:
                    break
                at = m.start()
            else:
                at = buf.find(first, pos, end)
                if at < 0:
                    break
            line_start, line_end = _line_around(buf, start, end, at)
            line = buf[line_start:line_end]
            # The regex must have matched the line's own leading keys, not an attribute inside it.
            if (not self.rx_at_line_start or at == line_start) and all(lit in line for lit in lits):
                out.append(line)
            pos = line_end + 1
        return out

    def matches(self, rec: dict[str, Any]) -> bool:
        if self.trace and not rec.get("t", "").startswith(self.trace):
            return False
        if self.service and rec.get("v") != self.service:
            return False
        if self.status is not None and rec.get("k") != self.status:
            return False
        if self.min_ns and rec.get("d", 0) < self.min_ns:
            return False
        if self.since_ns and rec.get("s", 0) < self.since_ns:
            return False
        return not (self.name_rx is not None and not self.name_rx.match(str(rec.get("n", ""))))


BLOCK = 1 << 22


def chunks_forward(path: Path, block: int = BLOCK) -> Iterator[tuple[bytearray, int, int]]:
    """(buffer, start, end): the file as regions of whole lines, first to last.

    One buffer is reused (readinto, no copies of the data): use a region before taking the next."""
    try:
        f = open(path, "rb", buffering=0)
    except FileNotFoundError:
        return
    with f:
        buf = bytearray(2 * block)
        have = 0
        while True:
            if len(buf) - have < block:
                buf.extend(bytes(len(buf)))  # a line longer than what the buffer holds
            n = f.readinto(memoryview(buf)[have:have + block])
            if not n:
                if have:
                    yield buf, 0, have
                return
            have += n
            cut = buf.rfind(b"\n", 0, have)
            if cut < 0:
                continue
            yield buf, 0, cut
            rest = have - cut - 1
            buf[:rest] = buf[cut + 1:have]
            have = rest


def chunks_backward(path: Path, block: int = BLOCK) -> Iterator[tuple[bytes, int, int]]:
    """(data, start, end): the file as regions of whole lines, last region first."""
    try:
        f = open(path, "rb", buffering=0)
    except FileNotFoundError:
        return
    with f:
        pos = os.fstat(f.fileno()).st_size
        carry = b""  # the head of a line whose tail is in the later block already read
        while pos > 0:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step)
            last = data.rfind(b"\n")
            if last < 0:
                carry = data + carry
                continue
            boundary = data[last + 1:] + carry  # the line that spans this block and the later one
            if boundary:
                yield boundary, 0, len(boundary)
            first = data.find(b"\n") if pos else -1
            carry = data[:first] if pos else b""
            if first + 1 < last:
                yield data, first + 1, last
        if carry:
            yield carry, 0, len(carry)


def _records(traces_dir: Path, flt: SpanFilter, limit: int | None) -> list[dict[str, Any]]:
    """Matching records, newest first (by arrival), at most `limit`, duplicates (retried exports) once."""
    out: list[dict[str, Any]] = []
    seen: set[tuple[Any, Any]] = set()  # (trace id, span id) as stored
    for path in reversed(store.files(traces_dir)):
        if flt.since_ns:
            try:
                if os.stat(path).st_mtime_ns < flt.since_ns:
                    break  # everything in it (and in older files) arrived, so started, before --since
            except OSError:
                continue
        for buf, start, end in chunks_backward(path):
            for line in reversed(flt.candidates(buf, start, end)):
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash mid-write
                if not isinstance(rec, dict) or not flt.matches(rec):
                    continue
                key = (rec.get("t"), rec.get("i"))
                if key in seen:
                    continue
                seen.add(key)
                out.append(rec)
                if limit is not None and len(out) >= limit:
                    return out
    return out


# ---------------------------------------------------------------- public


def find_spans(box_dir: Path | str, *, service: str | None = None, name: str | None = None,
               min_duration: Any = None, status: str | None = None, since: Any = None,
               trace_id: str | None = None, limit: int | None = DEFAULT_LIMIT) -> list[dict[str, Any]]:
    """The newest `limit` spans of a box that match every filter, in start order.

    min_duration: '200ms' / seconds; since: '5m' / ISO time / epoch seconds; status: error|ok|unset;
    name: a glob over span names; trace_id: 32 hex digits or a prefix of at least 8.
    """
    flt = SpanFilter(service=service, name=name, min_duration=min_duration, status=status, since=since,
                     trace_id=trace_id)
    if limit is not None and limit <= 0:
        return []
    recs = _records(Path(box_dir) / "traces", flt, limit)
    recs.sort(key=lambda r: (r.get("s", 0), r.get("i", "")))
    return [store.public(r) for r in recs]


def trace_tree(box_dir: Path | str, trace_id: str) -> dict[str, Any]:
    """One trace as a tree: its spans depth-first (children in start order), each with `depth`.

    A span whose parent was never received is shown as a root (with `parent_missing`). Raises
    NotFound when the box has no span of that trace, UsageError when a prefix names several.
    """
    tid = trace_id_of(trace_id)
    recs = _records(Path(box_dir) / "traces", SpanFilter(trace_id=tid), None)
    if not recs:
        raise NotFound(f"No span of trace {tid} was received by this box.")
    ids = sorted({r["t"] for r in recs})
    if len(ids) > 1:
        raise UsageError(f"{tid!r} is the start of {len(ids)} trace ids ({', '.join(ids[:3])}, ...); give more digits.")
    spans = [store.public(r) for r in recs]
    start_of = {r["i"]: r["s"] for r in recs}  # public() keeps microseconds; order by the nanoseconds
    by_id = {s["span_id"]: s for s in spans}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for s in spans:
        parent = s["parent_span_id"] if s["parent_span_id"] in by_id else None
        if s["parent_span_id"] and parent is None:
            s["parent_missing"] = True
        children.setdefault(parent, []).append(s)
    for group in children.values():
        group.sort(key=lambda s: (start_of[s["span_id"]], s["span_id"]))
    ordered: list[dict[str, Any]] = []
    stack = [(s, 0) for s in reversed(children.get(None, []))]
    while stack:
        s, depth = stack.pop()
        ordered.append({**s, "depth": depth})
        stack += [(c, depth + 1) for c in reversed(children.get(s["span_id"], []))]
    start_ns = min(r["s"] for r in recs)
    end_ns = max(r["s"] + r["d"] for r in recs)
    return {"trace_id": ids[0], "start": store.iso_ns(start_ns), "duration_ms": round((end_ns - start_ns) / 1e6, 3),
            "services": sorted({s["service"] for s in spans}), "span_count": len(spans), "spans": ordered}


def trace_logs(box_dir: Path | str, trace_id: str) -> list[dict[str, Any]]:
    """Log records of the box that carry the trace id: OTLP records (`trace_id`) and captured
    output lines that mention it (JSON log lines with a `trace_id` field), in time order."""
    from worktreebox.telemetry.logs.reader import _files, _sources

    tid = trace_id_of(trace_id)
    needle = tid.encode()
    logs_dir = Path(box_dir) / "logs"
    if not logs_dir.is_dir():
        return []
    out = []
    for source in _sources(logs_dir, None, True):
        for path in _files(logs_dir, source):
            for buf, start, end in chunks_forward(path):
                for line in _lines_with(buf, start, end, needle):
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(rec, dict) and (str(rec.get("trace_id", "")).startswith(tid)
                                                  or tid in str(rec.get("msg", ""))):
                        out.append(rec)
    out.sort(key=lambda r: str(r.get("ts", "")))
    return out


def _line_around(buf: bytes | bytearray, start: int, end: int, at: int) -> tuple[int, int]:
    """Start and end (without its newline) of the line of buf[start:end] that holds offset `at`."""
    line_start = buf.rfind(b"\n", start, at) + 1 or start
    line_end = buf.find(b"\n", at, end)
    return line_start, end if line_end < 0 else line_end


def _lines_with(buf: bytes | bytearray, start: int, end: int, needle: bytes) -> Iterator[bytes]:
    pos = start
    while True:
        at = buf.find(needle, pos, end)
        if at < 0:
            return
        line_start, line_end = _line_around(buf, start, end, at)
        yield bytes(buf[line_start:line_end])
        pos = line_end + 1
