"""`wtbox init`: a wtbox.toml from what the repo declares (compose, CI, Procfile, ...), or a starter one."""
from __future__ import annotations

import shutil
from pathlib import Path

import click

from worktreebox.cli.commands._common import emit_json, info, json_option, run_cmd
from worktreebox.errors import UsageError


def template_path(name: str) -> Path:
    from worktreebox.config.assets import asset_path

    return asset_path(f"templates/{name}")


@click.command()
@click.option("--repo", type=click.Path(file_okay=False), default=".", help="Where to write wtbox.toml.")
@click.option("--force", is_flag=True, help="Overwrite an existing wtbox.toml.")
@click.option("--explain", is_flag=True, help="Print what init found and what it could not map; write nothing.")
@json_option
@run_cmd
def init(repo, force, explain, as_json):
    """Write wtbox.toml from the repo's compose file, CI workflow, Procfile, package.json,
    devcontainer or manage.py (each line says where it came from); a starter one when they say nothing."""
    from worktreebox.derive import derive
    from worktreebox.derive.writer import check, explain_text, render
    from worktreebox.derive.writer import explain as explain_json

    root = Path(repo)
    if not root.is_dir():
        raise UsageError(f"--repo {repo}: no such directory.")
    dest = root / "wtbox.toml"
    plan = derive(root)
    text = None if plan.empty else render(plan)
    if text is not None:
        check(text)
    if explain:
        if as_json:
            emit_json({**explain_json(plan), "would_write": "derived" if text else "starter template"})
        else:
            starter = "" if text else "nothing to derive: init would write the starter template\n"
            click.echo(explain_text(plan) + starter, nl=False)
        return
    if dest.exists() and not force:
        raise UsageError(f"{dest} already exists; use --force to overwrite it (or --explain to see what init finds).")
    if text is None:
        shutil.copyfile(template_path("wtbox.toml"), dest)
    else:
        dest.write_text(text)
    if as_json:
        emit_json({"path": str(dest.resolve()), "derived_from": plan.files, "not_mapped": plan.notes})
    elif text is None:
        info(f"wrote {dest} (a starter: nothing in the repo declares services); edit it, commit it, "
             "then 'wtbox new TASK'")
    else:
        info(f"wrote {dest} from {', '.join(plan.files)}"
             + (f"; {len(plan.notes)} thing(s) not mapped (see the end of the file)" if plan.notes else "")
             + "; commit it, then 'wtbox new TASK'")
