"""Captured logs: writing service output as JSONL records, and reading them back fast.

A record is one line of `logs/<service>.jsonl`:
`{"ts": "2026-01-02T03:04:05.678Z", "service": ..., "stream": ..., "level": ..., "msg": ...}`.
The key order is fixed so the reader can take `ts`, `service` and `level` from the raw
line without json.loads; that is what keeps `--tail`/`--grep` on 200 MB logs fast.
"""
from __future__ import annotations

import collections
import functools
import heapq
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

if TYPE_CHECKING:
    import subprocess

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_ALIASES = {
    "trace": "debug", "debug": "debug", "dbg": "debug", "info": "info", "information": "info", "notice": "info",
    "warn": "warning", "warning": "warning", "err": "error", "error": "error", "exception": "error",
    "crit": "critical", "critical": "critical", "fatal": "critical", "panic": "critical", "alert": "critical",
    "emerg": "critical", "emergency": "critical",
}
MAX_BYTES = 50 * 1024 * 1024
KEEP = 3
EVENTS = "_events"
MAX_TRACEBACK_LINES = 1000  # a "traceback" that never ends is cut into records of this many lines  # start/ready/exit/restart events of the supervisor, same record shape

_TS_PREFIX = '{"ts": "'
_TS_END = len(_TS_PREFIX) + 24
# "ERROR ...", "[WARN] ...", "2024-01-01 12:00:00,123 ERROR ...", "2024-... - app - WARNING - ...",
# "ERROR:root:...", "level=error ...": a level word near the start, possibly after a timestamp.
_TEXT_LEVEL_RE = (
    r"^\s*(?:\[?\d{4}-\d\d-\d\d[T ][0-9:.,]+(?:Z|[+-]\d\d:?\d\d)?\]?\s*(?:[-|:]\s*)?"
    r"(?:[\w.\[\]-]+\s+[-|]\s+)?)?"
    r"[\[<(]?(?:level=)?(?P<lvl>CRITICAL|FATAL|ERROR|WARNING|WARN|INFO|DEBUG|TRACE|critical|fatal|error|"
    r"warning|warn|info|debug|trace|Error|Warning|Info|Debug|Critical|Fatal)(?![\w])"
)
_LOGFMT_LEVEL_RE = r"(?:^|\s)(?:level|lvl|severity)=\"?(?P<lvl>[A-Za-z]+)"
_TRACEBACK = "Traceback (most recent call last):"
_CHAIN = ("During handling of the above exception", "The above exception was the direct cause")


def now_ts() -> str:
    """RFC 3339 UTC with milliseconds; fixed width so string order is time order."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % (int(t * 1000) % 1000)


@functools.lru_cache(maxsize=None)
def _rx(pattern: str) -> "re.Pattern[str]":
    # Compiled on first use: only the writer needs these, and compiling costs ~20 ms at import.
    return re.compile(pattern)


def parse_level(line: str) -> str:
    """The level of one raw output line: JSON fields, logfmt, or a text prefix; else info."""
    s = line.lstrip()
    if s.startswith("{"):
        try:
            obj = json.loads(s)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            for key in ("level", "severity", "levelname", "lvl", "log.level"):
                val = obj.get(key)
                if isinstance(val, str) and val.lower() in _ALIASES:
                    return _ALIASES[val.lower()]
                if isinstance(val, int) and not isinstance(val, bool):
                    # Python logging (10..50) and pino/bunyan (10..60) numeric levels.
                    return "debug" if val < 20 else "info" if val < 30 else "warning" if val < 40 else \
                        "error" if val < 50 else "critical"
            return "info"
    m = _rx(_TEXT_LEVEL_RE).match(line)
    if m:
        return _ALIASES[m.group("lvl").lower()]
    m = _rx(_LOGFMT_LEVEL_RE).search(line[:200])
    if m and m.group("lvl").lower() in _ALIASES:
        return _ALIASES[m.group("lvl").lower()]
    if line.startswith(_TRACEBACK):
        return "error"
    return "info"


class LogWriter:
    """Turns the raw output lines of one service into records in logs/<service>.jsonl.

    Secrets are redacted before anything is written; a Python traceback (from its
    'Traceback' line through the exception line, chained ones included) becomes one
    `error` record; the file rotates at `max_bytes`. Thread-safe: stdout and stderr
    pumps share one writer.
    """

    def __init__(self, logs_dir: Path | str, service: str, redactor: Callable[[str], str] | None = None,
                 max_bytes: int = MAX_BYTES, keep: int = KEEP) -> None:
        self.dir = Path(logs_dir)
        self.service = service
        self.redact = redactor or (lambda s: s)
        self.max_bytes, self.keep = max_bytes, keep
        self.path = self.dir / f"{service}.jsonl"
        self._lock = threading.Lock()
        self._fh: Any = None
        self._size = 0
        # Per stream: lines of a traceback being collected, and whether its exception line came.
        self._tb: dict[str, list[str]] = {}
        self._tb_done: dict[str, bool] = {}

    # -- input
    def line(self, stream: str, text: str) -> None:
        """Feed one raw line (without newline)."""
        text = text.rstrip("\r\n")
        with self._lock:
            tb = self._tb.get(stream)
            if tb is not None:
                if self._continues_traceback(stream, text) and len(tb) < MAX_TRACEBACK_LINES:
                    tb.append(text)
                    return
                self._flush_tb(stream)
            if text.startswith(_TRACEBACK):
                self._tb[stream] = [text]
                self._tb_done[stream] = False
                return
            self._write(stream, parse_level(text), text)

    def _continues_traceback(self, stream: str, text: str) -> bool:
        if not self._tb_done[stream]:
            # Frames are indented; the first unindented line is the exception line.
            if not text.strip() or text[:1] in (" ", "\t") or text.startswith(_TRACEBACK):
                return True
            self._tb_done[stream] = True
            return True
        # After the exception line only a chained traceback continues the record.
        if not text.strip() or text.startswith(_CHAIN) or text.startswith(_TRACEBACK):
            if text.startswith(_TRACEBACK):
                self._tb_done[stream] = False
            return True
        return False

    def pending(self, stream: str) -> bool:
        """True while a traceback is being collected (the pump flushes it after a short quiet time)."""
        return stream in self._tb

    def flush(self, stream: str | None = None) -> None:
        with self._lock:
            for s in [stream] if stream else list(self._tb):
                if s in self._tb:
                    self._flush_tb(s)

    def _flush_tb(self, stream: str) -> None:
        lines = self._tb.pop(stream)
        self._tb_done.pop(stream, None)
        while lines and not lines[-1].strip():
            lines.pop()
        self._write(stream, "error", "\n".join(lines))

    def event(self, level: str, msg: str, service: str | None = None, **extra: Any) -> None:
        """An event record (start/ready/exit/restart): stream "event", about `service` (default: this one)."""
        with self._lock:
            self._write("event", level, msg, service=service, **extra)

    # -- output
    def _write(self, stream: str, level: str, msg: str, service: str | None = None, **extra: Any) -> None:
        rec = {"ts": now_ts(), "service": service or self.service, "stream": stream, "level": level,
               "msg": self.redact(msg)}
        if extra:
            rec.update(extra)
        data = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8", "replace")
        if self._fh is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "ab", buffering=0)
            self._size = self._fh.tell()
        if self._size and self._size + len(data) > self.max_bytes:
            self._rotate()
        self._fh.write(data)
        self._size += len(data)

    def _rotate(self) -> None:
        self._fh.close()
        # <svc>.jsonl.{keep-1} → .{keep} (the oldest is overwritten), …, <svc>.jsonl → .1
        for i in range(self.keep, 0, -1):
            dst = self.path.with_name(f"{self.path.name}.{i}")
            src = self.path.with_name(f"{self.path.name}.{i - 1}") if i > 1 else self.path
            if src.exists():
                os.replace(src, dst)
        self._fh = open(self.path, "ab", buffering=0)
        self._size = 0

    def close(self) -> None:
        self.flush()
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


class EventLog:
    """Writer of logs/_events.jsonl where every record carries the service it is about."""

    def __init__(self, logs_dir: Path | str) -> None:
        self._w = LogWriter(logs_dir, EVENTS)

    def __call__(self, service: str, level: str, msg: str, **extra: Any) -> None:
        self._w.event(level, msg, service=service, **extra)

    def close(self) -> None:
        self._w.close()


def pump(fd: int, stream: str, writer: LogWriter, on_line: Callable[[str], None] | None = None) -> None:
    """Read a pipe until EOF, feeding complete lines to the writer.

    select() with a short timeout lets a traceback that is not followed by another
    line still be written promptly (and seen by `logs --follow`).
    """
    import select

    buf = b""
    try:
        while True:
            if writer.pending(stream):
                ready, _, _ = select.select([fd], [], [], 0.3)
                if not ready:
                    writer.flush(stream)
                    continue
            data = os.read(fd, 65536)
            if not data:
                break
            buf += data
            if b"\n" not in buf and len(buf) < 65536:
                continue
            *lines, buf = buf.split(b"\n")
            if len(buf) >= 65536:  # an endless line: cut it rather than grow without bound
                lines.append(buf)
                buf = b""
            for raw in lines:
                text = raw.decode("utf-8", "replace")
                writer.line(stream, text)
                if on_line is not None:
                    on_line(text)
    except OSError:
        pass
    finally:
        if buf:
            text = buf.decode("utf-8", "replace")
            writer.line(stream, text)
            if on_line is not None:
                on_line(text)
        writer.flush(stream)
        try:
            os.close(fd)
        except OSError:
            pass


class OutputTail:
    """The last lines of a command's output, redacted, shared by its stdout and stderr pumps."""

    def __init__(self, redact: Callable[[str], str], keep: int) -> None:
        self._redact = redact
        self._lines: collections.deque[str] = collections.deque(maxlen=keep)
        self._lock = threading.Lock()

    def __call__(self, text: str) -> None:
        with self._lock:
            self._lines.append(self._redact(text))

    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)


def start_logged(cmd: str, cwd: Path | str, env: dict[str, str], writer: "LogWriter",
                 tail: OutputTail) -> tuple["subprocess.Popen", list[threading.Thread]]:
    """Start `sh -c cmd` in its own session with both streams pumped into `writer` as records."""
    import subprocess

    proc = subprocess.Popen(["/bin/sh", "-c", cmd], cwd=str(cwd), env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    threads = []
    for pipe, stream in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
        fd = os.dup(pipe.fileno())
        pipe.close()
        t = threading.Thread(target=pump, args=(fd, stream, writer, tail), daemon=True)
        t.start()
        threads.append(t)
    return proc, threads


def kill_group(proc: "subprocess.Popen", wait: float = 3.0) -> None:
    """SIGTERM the command's process group, wait, then SIGKILL; reaps the leader."""
    import signal
    import subprocess

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        pass


def join_pumps(threads: list[threading.Thread]) -> None:
    # Children that keep the pipe open must not hang us: give the pumps a moment, then move on.
    for t in threads:
        t.join(timeout=2)


def run_logged(cmd: str, cwd: Path | str, env: dict[str, str], logs_dir: Path | str, service: str,
               redactor: Callable[[str], str] | None = None, timeout: float | None = None,
               keep_lines: int = 10) -> tuple[int, list[str]]:
    """Run a shell command once with its output captured as records; (returncode, last lines redacted)."""
    import subprocess

    redact = redactor or (lambda s: s)
    writer = LogWriter(logs_dir, service, redact)
    tail = OutputTail(redact, keep_lines)
    proc, threads = start_logged(cmd, cwd, env, writer, tail)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        rc = 124
        msg = f"wtbox: timed out after {timeout:g}s"
        writer.line("stderr", msg)
        tail(msg)
    finally:
        join_pumps(threads)
        writer.close()
    return rc, tail.lines()


# ------------------------------------------------------------------ reading

def level_at_least(min_level: str | None) -> int:
    if not min_level:
        return 0
    key = _ALIASES.get(min_level.lower())
    if key is None:
        from .errors import UsageError

        raise UsageError(f"Unknown level {min_level!r}; use one of debug, info, warning, error, critical.")
    return LEVELS[key]


def parse_time(text: str | None, now: float | None = None) -> str | None:
    """'5m', '2h', '30s' (ago) or an ISO time → the RFC 3339 string records are compared with."""
    if text is None or text == "":
        return None
    import datetime as dt

    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", text)
    if m:
        secs = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
        t = (now if now is not None else time.time()) - secs
        return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + \
            "%03dZ" % (int(t * 1000) % 1000)
    try:
        d = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        from .errors import UsageError

        raise UsageError(f"Cannot read the time {text!r}; use a duration such as '5m' or an ISO time.") from None
    if d.tzinfo is None:
        d = d.astimezone()  # a naive time is the user's local time
    d = d.astimezone(dt.timezone.utc)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (d.microsecond // 1000)


class _Filter:
    """Cheap checks on the raw line first; json.loads only for lines that may match."""

    def __init__(self, services: Iterable[str] | None, since: str | None, until: str | None,
                 min_level: str | None, grep: str | None) -> None:
        self.services = set(services) if services else None
        self.since, self.until = since, until
        self.min_level = level_at_least(min_level)
        self.rx = None
        self.raw_ok = False
        self.literal: bytes | None = None
        if grep:
            try:
                self.rx = re.compile(grep)
            except re.error as e:
                from .errors import UsageError

                raise UsageError(f"--grep {grep!r} is not a valid regular expression: {e}.") from None
            # A match of the message is a match of the raw line (a superset) unless the pattern is
            # anchored or looks around; then every line is parsed.
            self.raw_ok = not re.search(r"[\^$]|\\[AZBGz]|\(\?[<=!]", grep)
            # A plain string (no regex syntax, no quote, backslash or control character) can be
            # found in the raw bytes with bytes.find, without decoding, and escapes cannot hide it.
            if not re.search(r'[.^$*+?{}\[\]\\|()"\x00-\x1f]', grep):
                self.literal = grep.encode("utf-8")

    def ts(self, line: str) -> str | None:
        if line.startswith(_TS_PREFIX):
            return line[len(_TS_PREFIX):_TS_END]
        return None

    def raw_maybe(self, line: str) -> bool:
        """False when the raw line certainly fails the filters."""
        ts = self.ts(line)
        if ts is not None:
            if self.since and ts < self.since:
                return False
            if self.until and ts > self.until:
                return False
        if self.min_level:
            i = line.find('"level": "')
            if i >= 0:
                j = line.find('"', i + 10)
                if LEVELS.get(line[i + 10:j], 20) < self.min_level:
                    return False
        if self.rx is not None and self.raw_ok and "\\" not in line and not self.rx.search(line):
            return False
        return True

    def record(self, line: str) -> dict | None:
        """The record when it passes every filter (line already passed raw_maybe)."""
        if not line.strip():
            return None
        try:
            rec = json.loads(line)
        except ValueError:
            return None
        if not isinstance(rec, dict):
            return None
        if self.services is not None and rec.get("service") not in self.services:
            return None
        ts = rec.get("ts", "")
        if self.since and ts < self.since or self.until and ts > self.until:
            return None
        if self.min_level and LEVELS.get(rec.get("level", "info"), 20) < self.min_level:
            return None
        if self.rx is not None and not self.rx.search(str(rec.get("msg", ""))):
            return None
        return rec


def _files(logs_dir: Path, service: str) -> list[Path]:
    """A service's files oldest first: <svc>.jsonl.N … .1, <svc>.jsonl."""
    base = logs_dir / f"{service}.jsonl"
    rotated = []
    for p in logs_dir.glob(f"{service}.jsonl.*"):
        suffix = p.name.rsplit(".", 1)[-1]
        if suffix.isdigit():
            rotated.append((int(suffix), p))
    return [p for _, p in sorted(rotated, reverse=True)] + ([base] if base.exists() else [])


def available_services(logs_dir: Path | str) -> list[str]:
    names = set()
    for p in Path(logs_dir).glob("*.jsonl*"):
        name = p.name.split(".jsonl", 1)[0]
        names.add(name)
    return sorted(names)


def _seek_since(f: Any, since: str) -> None:
    """Binary search on byte offsets for the first line with ts >= since (records are in ts order)."""
    f.seek(0, os.SEEK_END)
    lo, hi = 0, f.tell()
    while hi - lo > 65536:
        mid = (lo + hi) // 2
        f.seek(mid)
        f.readline()
        line = f.readline()
        if not line:
            hi = mid
            continue
        ts = line[len(_TS_PREFIX):_TS_END].decode("ascii", "replace") if line.startswith(b'{"ts": "') else None
        if ts is None or ts >= since:
            hi = mid
        else:
            lo = mid
    f.seek(lo)
    if lo:
        f.readline()


def _blocks_forward(path: Path, since: str | None, block: int = 1 << 22) -> Iterator[bytes]:
    """The file as chunks of whole lines, first to last (from the first line >= since)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        if since:
            _seek_since(f, since)
        rest = b""
        while True:
            data = f.read(block)
            if not data:
                break
            data = rest + data
            cut = data.rfind(b"\n")
            if cut < 0:
                rest = data
                continue
            rest = data[cut + 1:]
            yield data[:cut]
        if rest:
            yield rest


def _blocks_backward(path: Path, block: int = 1 << 20) -> Iterator[bytes]:
    """The file as chunks of whole lines, last chunk first, reading blocks from the end."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        f.seek(0, os.SEEK_END)
        pos = f.tell()
        rest = b""
        while pos > 0:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + rest
            if pos == 0:
                rest = data
                break
            first = data.find(b"\n")
            if first < 0:
                rest = data
                continue
            rest = data[:first]
            if first + 1 < len(data):
                yield data[first + 1:]
        if rest:
            yield rest


@functools.lru_cache(maxsize=None)
def _level_rx(min_level: int) -> "re.Pattern[bytes]":
    return re.compile(b'"level": "(?:%s)"' % "|".join(k for k, v in LEVELS.items() if v >= min_level).encode())


def _candidates(chunk: bytes, flt: _Filter) -> list[str]:
    """Lines of a chunk that may pass the filters, in file order.

    What must match (the --grep string or regex, else the --level pattern) is searched over
    the whole chunk, so lines that cannot match cost nothing in Python. Escaped characters (a
    backslash in the raw JSON) can hide a --grep regex match: such chunks go line by line.
    """
    data: bytes | str = chunk
    if flt.literal is not None:
        literal = flt.literal

        def find(buf, pos):  # type: ignore[no-untyped-def]
            return buf.find(literal, pos)
    elif flt.rx is None and flt.min_level > LEVELS["debug"]:
        rxb = _level_rx(flt.min_level)

        def find(buf, pos):  # type: ignore[no-untyped-def]
            m = rxb.search(buf, pos)
            return m.start() if m else -1
    else:
        data = chunk.decode("utf-8", "replace")
        if flt.rx is None or not flt.raw_ok or "\\" in data:
            return [line for line in data.split("\n") if line and flt.raw_maybe(line)]
        rx = flt.rx

        def find(buf, pos):  # type: ignore[no-untyped-def]
            m = rx.search(buf, pos)
            return m.start() if m else -1
    nl = b"\n" if isinstance(data, bytes) else "\n"
    out = []
    pos, n = 0, len(data)
    while pos < n:
        at = find(data, pos)
        if at < 0:
            break
        start = data.rfind(nl, 0, at) + 1
        end = data.find(nl, at)
        if end < 0:
            end = n
        line = data[start:end]
        if isinstance(line, bytes):
            line = line.decode("utf-8", "replace")
        if line and flt.raw_maybe(line):
            out.append(line)
        pos = end + 1  # the next match starts in a later line: a match that spans lines skips none
    return out


def _forward_records(logs_dir: Path, service: str, flt: _Filter) -> Iterator[tuple[str, dict]]:
    for path in _files(logs_dir, service):
        for chunk in _blocks_forward(path, flt.since):
            for line in _candidates(chunk, flt):
                rec = flt.record(line)
                if rec is not None:
                    yield rec.get("ts", ""), rec
                elif flt.until and (flt.ts(line) or "") > flt.until:
                    return  # records are in time order: nothing later can pass --until


def _backward_records(logs_dir: Path, service: str, flt: _Filter) -> Iterator[tuple[str, dict]]:
    for path in reversed(_files(logs_dir, service)):
        for chunk in _blocks_backward(path):
            for line in reversed(_candidates(chunk, flt)):
                rec = flt.record(line)
                if rec is not None:
                    yield rec.get("ts", ""), rec
            if flt.since:
                first = flt.ts(chunk[:_TS_END].decode("utf-8", "replace"))
                if first is not None and first < flt.since:
                    return  # this chunk reached back past --since; everything before is older


def _sources(logs_dir: Path, services: Iterable[str] | None, include_events: bool) -> list[str]:
    names = [s for s in available_services(logs_dir) if not s.startswith("_")]
    if services:
        names = [s for s in names if s in set(services)]
    if include_events and EVENTS in available_services(logs_dir):
        names.append(EVENTS)
    return names


def read_records(logs_dir: Path | str, services: Iterable[str] | None = None, since: str | None = None,
                 until: str | None = None, min_level: str | None = None, grep: str | None = None,
                 tail: int | None = None, include_events: bool = True) -> list[dict]:
    """Matching records of the selected services (all when None), merged in time order.

    `since`/`until` are RFC 3339 strings (see parse_time); `tail` keeps the last N, and is
    read backwards from the ends of the files so it costs the same on a 200 MB log.
    """
    logs_dir = Path(logs_dir)
    services = list(services) if services else None
    flt = _Filter(services, since, until, min_level, grep)
    names = _sources(logs_dir, services, include_events)
    if tail is not None:
        if tail <= 0:
            return []
        # Reversed source order: records with equal ts come out in the same order as without --tail.
        streams = [_backward_records(logs_dir, n, flt) for n in reversed(names)]
        merged = heapq.merge(*streams, key=lambda x: x[0], reverse=True)
        out = []
        for _, rec in merged:
            out.append(rec)
            if len(out) >= tail:
                break
        out.reverse()
        return out
    streams = [_forward_records(logs_dir, n, flt) for n in names]
    return [rec for _, rec in heapq.merge(*streams, key=lambda x: x[0])]


def follow(logs_dir: Path | str, services: Iterable[str] | None = None, min_level: str | None = None,
           grep: str | None = None, include_events: bool = True, poll: float = 0.2,
           stop: Callable[[], bool] | None = None, from_start: bool = False) -> Iterator[dict]:
    """Records appended after the call (or all, with from_start), until stop(); survives rotation."""
    logs_dir = Path(logs_dir)
    services = list(services) if services else None
    flt = _Filter(services, None, None, min_level, grep)
    # path -> [file handle, inode, partial line]
    open_files: dict[Path, list[Any]] = {}

    def scan(initial: bool) -> None:
        for name in _sources(logs_dir, services, include_events):
            path = logs_dir / f"{name}.jsonl"
            if path in open_files:
                continue
            try:
                fh = open(path, "rb")
            except FileNotFoundError:
                continue
            if initial and not from_start:
                fh.seek(0, os.SEEK_END)
            open_files[path] = [fh, os.fstat(fh.fileno()).st_ino, b""]

    scan(True)  # now, not at the first next(): lines written after the call must not be missed
    return _follow_loop(logs_dir, flt, open_files, scan, poll, stop)


def _follow_loop(logs_dir: Path, flt: _Filter, open_files: dict[Path, list[Any]], scan: Callable[[bool], None],
                 poll: float, stop: Callable[[], bool] | None) -> Iterator[dict]:
    try:
        while not (stop and stop()):
            batch: list[tuple[str, dict]] = []
            for path, entry in list(open_files.items()):
                fh, ino, rest = entry
                data = fh.read()
                if data:
                    data = rest + data
                    cut = data.rfind(b"\n")
                    entry[2] = data[cut + 1:]
                    for line in data[:cut + 1].decode("utf-8", "replace").split("\n"):
                        if line and flt.raw_maybe(line):
                            rec = flt.record(line)
                            if rec is not None:
                                batch.append((rec.get("ts", ""), rec))
                try:
                    st = os.stat(path)
                    rotated = st.st_ino != ino
                except FileNotFoundError:
                    rotated = True
                if rotated:
                    # The old file is complete (we just read to its end); read the new one from its start.
                    fh.close()
                    del open_files[path]
                    try:
                        nfh = open(path, "rb")
                        open_files[path] = [nfh, os.fstat(nfh.fileno()).st_ino, b""]
                    except FileNotFoundError:
                        pass
            scan(False)
            batch.sort(key=lambda x: x[0])
            for _, rec in batch:
                yield rec
            if not batch:
                time.sleep(poll)
    finally:
        for fh, _, _ in open_files.values():
            fh.close()
