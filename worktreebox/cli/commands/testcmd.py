"""`wtbox test BOX`: the repo's test command in the box (operations/boxes.TEST), its output shown as it comes."""
from __future__ import annotations

import sys

import click

from worktreebox.cli.build import command
from worktreebox.cli.commands._common import emit_json, get_host, info
from worktreebox.operations import boxes


@command(boxes.TEST)
def test(box, cmd, timeout, as_json):
    r = boxes.test(get_host(), box, cmd, timeout, on_line=None if as_json else click.echo)
    if as_json:
        emit_json(r)
    else:
        counts = ", ".join(f"{r[k]} {k}" for k in ("passed", "failed", "errors") if k in r)
        info(f"wtbox: `{r['cmd']}` in {r['id']}: exit {r['exit']}{' (timed out)' if r['timed_out'] else ''} "
             f"in {r['seconds']:.1f}s" + (f" ({counts})" if counts else ""))
    sys.exit(r["exit"] if 0 <= r["exit"] < 256 else 1)
