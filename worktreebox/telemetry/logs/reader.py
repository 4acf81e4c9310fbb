"""Reading captured logs fast: filters on the raw line first, tail from the end, follow across rotation.

Records are in time order per file (see record.py), so `--since` is a binary search and
`--tail` reads blocks backwards; json.loads runs only on lines that may match.
"""
from __future__ import annotations

import functools
import heapq
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from worktreebox.errors import UsageError
from worktreebox.telemetry.logs.record import ALIASES, EVENTS, LEVELS, OTLP, TS_END, TS_PREFIX


def level_at_least(min_level: str | None) -> int:
    if not min_level:
        return 0
    key = ALIASES.get(min_level.lower())
    if key is None:
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
        return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.") + \
            f"{int(t * 1000) % 1000:03d}Z"
    try:
        d = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"Cannot read the time {text!r}; use a duration such as '5m' or an ISO time.") from None
    if d.tzinfo is None:
        d = d.astimezone()  # a naive time is the user's local time
    d = d.astimezone(dt.UTC)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}Z"


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
                        raise UsageError(f"--grep {grep!r} is not a valid regular expression: {e}.") from None
            # A match of the message is a match of the raw line (a superset) unless the pattern is
            # anchored or looks around; then every line is parsed.
            self.raw_ok = not re.search(r"[\^$]|\\[AZBGz]|\(\?[<=!]", grep)
            # A plain string (no regex syntax, no quote, backslash or control character) can be
            # found in the raw bytes with bytes.find, without decoding, and escapes cannot hide it.
            if not re.search(r'[.^$*+?{}\[\]\\|()"\x00-\x1f]', grep):
                self.literal = grep.encode("utf-8")

    def ts(self, line: str) -> str | None:
        if line.startswith(TS_PREFIX):
            return line[len(TS_PREFIX):TS_END]
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
        return not (self.rx is not None and self.raw_ok and "\\" not in line and not self.rx.search(line))

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
        if (self.since and ts < self.since) or (self.until and ts > self.until):
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
        ts = line[len(TS_PREFIX):TS_END].decode("ascii", "replace") if line.startswith(b'{"ts": "') else None
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


@functools.cache
def _level_rx(min_level: int) -> re.Pattern[bytes]:
    return re.compile(b'"level": "(?:%s)"' % "|".join(k for k, v in LEVELS.items() if v >= min_level).encode())


def _candidates(chunk: bytes, flt: _Filter) -> list[str]:
    """Lines of a chunk that may pass the filters, in file order.

    What must match (the --grep string or regex, else the --level pattern) is searched over
    the whole chunk, so lines that cannot match cost nothing in Python. Escaped characters (a
    backslash in the raw JSON) can hide a --grep regex match: such chunks go line by line.
    """
    data: Any = chunk  # bytes, or str when a regex must see decoded text
    if flt.literal is not None:
        literal = flt.literal

        def find(buf, pos):
            return buf.find(literal, pos)
    elif flt.rx is None and flt.min_level > LEVELS["debug"]:
        rxb = _level_rx(flt.min_level)

        def find(buf, pos):
            m = rxb.search(buf, pos)
            return m.start() if m else -1
    else:
        data = chunk.decode("utf-8", "replace")
        if flt.rx is None or not flt.raw_ok or "\\" in data:
            return [line for line in data.split("\n") if line and flt.raw_maybe(line)]
        rx = flt.rx

        def find(buf, pos):
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
                first = flt.ts(chunk[:TS_END].decode("utf-8", "replace"))
                if first is not None and first < flt.since:
                    return  # this chunk reached back past --since; everything before is older


def _sources(logs_dir: Path, services: Iterable[str] | None, include_events: bool) -> list[str]:
    present = available_services(logs_dir)
    names = [s for s in present if not s.startswith("_")]
    if services:
        names = [s for s in names if s in set(services)]
    if include_events and EVENTS in present:
        names.append(EVENTS)
    if OTLP in present:
        names.append(OTLP)
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
