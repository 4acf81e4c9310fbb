"""`wtbox diff A B`: what differs between two boxes, in a few lines (fleet/diff.py)."""
from __future__ import annotations

import click

from worktreebox.cli.build import command
from worktreebox.cli.commands._common import emit_json, get_host
from worktreebox.operations import fleet


@command(fleet.DIFF)
def diff(a, b, as_json):
    from worktreebox.fleet.diff import lines

    out = fleet.diff(get_host(), a, b)
    if as_json:
        emit_json(out)
        return
    for line in lines(out):
        click.echo(line)
