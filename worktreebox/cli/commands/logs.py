"""`wtbox logs BOX`: filter, tail and follow the captured output of a box's services."""
from __future__ import annotations

import json
import sys
import zlib

import click

from worktreebox.cli.build import command
from worktreebox.cli.commands._common import get_host
from worktreebox.operations import observe
from worktreebox.telemetry.logs.record import printable

# Like honcho: each service keeps one colour, picked from its name so it is stable across runs.
_COLOURS = ["36", "33", "32", "35", "34", "96", "93", "92", "95", "94"]
_LEVEL_COLOURS = {"warning": "33", "error": "31", "critical": "1;31"}


def _printer(as_json: bool, colour: bool, width: int):
    out = sys.stdout

    def emit(rec: dict) -> None:
        if as_json:
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            out.flush()
            return
        svc = str(rec.get("service", "?"))
        ts = str(rec.get("ts", ""))[11:23]
        sep = "*" if rec.get("stream") == "event" else "|"
        prefix = f"{ts} {svc.ljust(width)} {sep} "
        level = rec.get("level")
        msg = printable(str(rec.get("msg", "")))  # a service never drives the reader's terminal
        if colour:
            c = _COLOURS[zlib.crc32(svc.encode()) % len(_COLOURS)]
            prefix = f"\033[{c}m{prefix}\033[0m"
            if level in _LEVEL_COLOURS:
                msg = f"\033[{_LEVEL_COLOURS[level]}m{msg}\033[0m"
        for line in msg.split("\n"):
            out.write(prefix + line + "\n")
        out.flush()

    return emit


FOLLOW = click.option("--follow", "-f", is_flag=True, help="Keep printing new records as they are written.")
JSON_LINES = click.option("--json", "as_json", is_flag=True, help="JSON lines: one record per line, nothing else.")


@command(observe.LOGS, extras=[FOLLOW, JSON_LINES], json=False)
def logs(box, service, since, until, level, grep, tail, follow, as_json):
    from worktreebox.telemetry.logs import reader as L

    host, services = get_host(), list(service)
    b = host.get(box)
    since_ts, until_ts = L.parse_time(since), L.parse_time(until)
    L.level_at_least(level)  # validate before reading anything
    known = observe.log_services(host, b, services)
    width = max([len(s) for s in (services or known)] + [6])
    emit = _printer(as_json, sys.stdout.isatty() and not as_json, width)
    if follow and tail is None and since is None:
        tail = 10
    try:  # Ctrl-C goes up: "wtbox: interrupted.", exit 130
        stream = L.follow(b.logs_dir, services or None, min_level=level, grep=grep) if follow else None
        seen_last: list[dict] = []
        for rec in L.read_records(b.logs_dir, services or None, since_ts, until_ts, level, grep, tail):
            emit(rec)
            seen_last.append(rec)
        if stream is None:
            return
        last_ts = seen_last[-1]["ts"] if seen_last else ""
        recent = [r for r in seen_last if r.get("ts") == last_ts]
        for rec in stream:
            # follow() opened the files before the read above; skip what was already printed.
            if rec.get("ts", "") < last_ts or rec in recent:
                continue
            if until_ts and rec.get("ts", "") > until_ts:
                return
            emit(rec)
    except BrokenPipeError:  # `wtbox logs ... | head`
        sys.stderr.close()

