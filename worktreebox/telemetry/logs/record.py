"""The record format shared by the writer and the reader.

A record is one line of `logs/<service>.jsonl`:
`{"ts": "2026-01-02T03:04:05.678Z", "service": ..., "stream": ..., "level": ..., "msg": ...}`.
The key order is fixed so the reader can take `ts`, `service` and `level` from the raw
line without json.loads; that is what keeps `--tail`/`--grep` on 200 MB logs fast.
"""
from __future__ import annotations

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
