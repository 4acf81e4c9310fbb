"""Writing captured output: raw lines of a service into JSONL records (see record.py), rotated.

A Python traceback becomes one `error` record; secrets are redacted before anything is
written; `pump` feeds a pipe into a writer; `EventLog` writes the supervisor's events.
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worktreebox.telemetry.logs.record import ALIASES, EVENTS, compiled, strip_ansi

MAX_BYTES = 50 * 1024 * 1024
KEEP = 3
MAX_TRACEBACK_LINES = 1000  # a "traceback" that never ends is cut into records of this many lines

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
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"




def parse_level(line: str) -> str:
    """The level of one raw output line: JSON fields, logfmt, or a text prefix (colours aside); else info."""
    line = strip_ansi(line)
    s = line.lstrip()
    if s.startswith("{"):
        try:
            obj = json.loads(s)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            for key in ("level", "severity", "levelname", "lvl", "log.level"):
                val = obj.get(key)
                if isinstance(val, str) and val.lower() in ALIASES:
                    return ALIASES[val.lower()]
                if isinstance(val, int) and not isinstance(val, bool):
                    # Python logging (10..50) and pino/bunyan (10..60) numeric levels.
                    return "debug" if val < 20 else "info" if val < 30 else "warning" if val < 40 else \
                        "error" if val < 50 else "critical"
            return "info"
    m = compiled(_TEXT_LEVEL_RE).match(line)
    if m:
        return ALIASES[m.group("lvl").lower()]
    m = compiled(_LOGFMT_LEVEL_RE).search(line[:200])
    if m and m.group("lvl").lower() in ALIASES:
        return ALIASES[m.group("lvl").lower()]
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

    def write(self, stream: str, level: str, msg: str, service: str | None = None, **extra: Any) -> None:
        """One record that arrives structured (OTLP logs): no level guessing, no traceback joining."""
        with self._lock:
            self._write(stream, level, msg, service=service, **extra)

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
        rotate(self.path, self.keep)
        self._fh = open(self.path, "ab", buffering=0)
        self._size = 0

    def close(self) -> None:
        self.flush()
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


def rotate(path: Path, keep: int) -> None:
    """<name>.{keep-1} → .{keep} (the oldest is overwritten), …, <name> → <name>.1."""
    for i in range(keep, 0, -1):
        dst = path.with_name(f"{path.name}.{i}")
        src = path.with_name(f"{path.name}.{i - 1}") if i > 1 else path
        if src.exists():
            os.replace(src, dst)


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


