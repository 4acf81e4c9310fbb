"""`wtbox init`: write a starter wtbox.toml."""
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
@json_option
@run_cmd
def init(repo, force, as_json):
    """Write a commented starter wtbox.toml."""
    dest = Path(repo) / "wtbox.toml"
    if dest.exists() and not force:
        raise UsageError(f"{dest} already exists; use --force to overwrite it.")
    shutil.copyfile(template_path("wtbox.toml"), dest)
    if as_json:
        emit_json({"path": str(dest.resolve())})
    else:
        info(f"wrote {dest}; edit it, commit it, then 'wtbox new TASK'")
