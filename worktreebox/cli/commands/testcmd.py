"""`wtbox test BOX`: the repo's test command run in the box (fleet/testrun.py)."""
from __future__ import annotations

import sys

import click

from worktreebox.cli.commands._common import box_argument, emit_json, get_host, info, json_option, run_cmd


@click.command("test")
@box_argument
@click.option("--cmd", help="Run this instead of [test] cmd.")
@click.option("--timeout", help="Stop it after this long (e.g. 30m); default [test] timeout or 30m.")
@json_option
@run_cmd
def test(box, cmd, timeout, as_json):
    """Run the box's test command ([test] cmd, found by `wtbox init`) with the box env, in the box;
    exits with its exit code."""
    from worktreebox.config.load import parse_duration
    from worktreebox.fleet.testrun import run_test

    host = get_host()
    b = host.get(box)
    limit = parse_duration(timeout, where="--timeout", positive=True) if timeout else None
    r = run_test(host, b, cmd, limit, on_line=None if as_json else click.echo)
    if as_json:
        emit_json({"id": b.id, **r})
    else:
        counts = ", ".join(f"{r[k]} {k}" for k in ("passed", "failed", "errors") if k in r)
        info(f"wtbox: `{r['cmd']}` in {b.id}: exit {r['exit']}{' (timed out)' if r['timed_out'] else ''} "
             f"in {r['seconds']:.1f}s" + (f" ({counts})" if counts else ""))
    sys.exit(r["exit"] if 0 <= r["exit"] < 256 else 1)
