"""`wtbox top`: what every box uses right now, busiest first."""
from __future__ import annotations

import json
import sys
import time

import click

from worktreebox.cli.build import command
from worktreebox.cli.commands._common import emit_json, get_host, info, table
from worktreebox.operations import observe

WATCH_EVERY = 2.0


WATCH = click.option("--watch", is_flag=True,
                     help="Refresh every 2 s until Ctrl-C (with --json: one JSON array per line).")


@command(observe.TOP, extras=[WATCH])
def top(watch, as_json):
    host = get_host()
    while True:
        t0 = time.monotonic()
        rows = observe.top(host)
        if as_json:
            if watch:
                sys.stdout.write(json.dumps(rows, default=str) + "\n")
                sys.stdout.flush()
            else:
                emit_json(rows)
        else:
            if watch and sys.stdout.isatty():
                click.echo("\x1b[H\x1b[2J", nl=False)  # redraw in place
            _print(rows)
        if not watch:
            return
        time.sleep(max(0.0, WATCH_EVERY - (time.monotonic() - t0)))  # Ctrl-C: "interrupted", exit 130


def _print(rows: list[dict]) -> None:
    if not rows:
        info("no boxes; create one with 'wtbox new TASK'")
        return
    table([[r["id"], f"{r['cpu_percent']:.1f}", _mem(r), _of(r["pids"], r["pids_max"]),
            " ".join(f"{k}={v}" for k, v in r["ports"].items()),
            r["state"] + (" (background)" if r.get("background") else "")] for r in rows],
          ["ID", "CPU%", "MEMORY", "TASKS", "PORTS", "STATE"])
    if any(r["source"] == "processes" for r in rows):
        info("(no cgroups here: usage is summed over the processes found by WTBOX_ID and cwd; see 'wtbox doctor')")


def _mem(r: dict) -> str:
    text = _size(r["memory_bytes"])
    return f"{text} / {_size(r['memory_max'])}" if r.get("memory_max") else text


def _of(n, limit) -> str:
    return "-" if n is None else f"{n} / {limit}" if limit else str(n)


def _size(n) -> str:
    if n is None:
        return "-"
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f}{unit}"
    return f"{n}B"
