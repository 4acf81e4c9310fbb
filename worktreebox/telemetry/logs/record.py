"""The record format shared by the writer and the reader.

A record is one line of `logs/<service>.jsonl`:
`{"ts": "2026-01-02T03:04:05.678Z", "service": ..., "stream": ..., "level": ..., "msg": ...}`.
The key order is fixed so the reader can take `ts`, `service` and `level` from the raw
line without json.loads; that is what keeps `--tail`/`--grep` on 200 MB logs fast.
"""
from __future__ import annotations

import functools
import re

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
# Level words as programs write them -> the level a record carries.
ALIASES = {
    "trace": "debug", "debug": "debug", "dbg": "debug", "info": "info", "information": "info", "notice": "info",
    "warn": "warning", "warning": "warning", "err": "error", "error": "error", "exception": "error",
    "crit": "critical", "critical": "critical", "fatal": "critical", "panic": "critical", "alert": "critical",
    "emerg": "critical", "emergency": "critical",
}
# start/ready/exit/restart events of the supervisor: same record shape, in logs/_events.jsonl.
EVENTS = "_events"
# Log records received on the box's OTLP endpoint (each naming its service), in logs/_otlp.jsonl.
OTLP = "_otlp"

TS_PREFIX = '{"ts": "'
TS_END = len(TS_PREFIX) + 24  # where the fixed-width timestamp of a raw line ends


# Terminal escapes a program's output may carry: CSI (colours, cursor moves, clearing), OSC (window
# titles, hyperlinks; ended by BEL or ESC \\) and the other two-byte escapes.
_ANSI = r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])"
_CONTROL = r"[\x00-\x08\x0b-\x1f\x7f-\x9f]"  # what is left that a terminal acts on (not tab or newline)


@functools.cache
def compiled(pattern: str) -> re.Pattern[str]:
    """A pattern compiled on first use (the writer's level patterns cost ~20 ms to compile at import)."""
    return re.compile(pattern)


def strip_ansi(text: str) -> str:
    """`text` without terminal escapes (a coloured `WARNING:` is a warning)."""
    return compiled(_ANSI).sub("", text) if "\x1b" in text else text


def printable(text: str) -> str:
    """`text` safe for a reader's terminal: escapes removed, other control bytes shown as \\xNN."""
    return compiled(_CONTROL).sub(lambda m: f"\\x{ord(m.group()):02x}", strip_ansi(text))
