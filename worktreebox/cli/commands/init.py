"""`wtbox init`: wtbox.toml from what the repo declares (compose, CI, Procfile, ...), or a starter one."""
from __future__ import annotations

import click

from worktreebox.cli.build import command
from worktreebox.cli.commands._common import emit_json, info
from worktreebox.operations import admin


@command(admin.INIT)
def init(repo, force, explain, as_json):
    out = admin.init(None, repo, force, explain)
    if explain:
        text = out.pop("text")
        emit_json(out) if as_json else click.echo(text, nl=False)
    elif as_json:
        emit_json(out)
    elif out["starter"]:
        info(f"wrote {out['path']} (a starter: nothing in the repo declares services); edit it, commit it, "
             "then 'wtbox new TASK'")
    else:
        notes = len(out["not_mapped"])
        info(f"wrote {out['path']} from {', '.join(out['derived_from'])}"
             + (f"; {notes} thing(s) not mapped (see the end of the file)" if notes else "")
             + "; commit it, then 'wtbox new TASK'")
