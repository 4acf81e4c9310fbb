"""`wtbox init`: write a starter wtbox.toml."""
from __future__ import annotations

from pathlib import Path

from worktreebox.cli.build import command
from worktreebox.cli.commands._common import emit_json, info
from worktreebox.operations import admin


@command(admin.INIT)
def init(repo, force, as_json):
    out = admin.init(None, repo, force)
    if as_json:
        emit_json(out)
    else:
        info(f"wrote {Path(repo) / 'wtbox.toml'}; edit it, commit it, then 'wtbox new TASK'")
