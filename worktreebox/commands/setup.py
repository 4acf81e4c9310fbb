"""Host-level commands: init (starter wtbox.toml) and doctor (what is missing, what leaked)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import click

from ..errors import UsageError
from ._common import emit_json, get_host, info, json_option, run_cmd, table


def template_path(name: str) -> Path:
    from ..assets import asset_path

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


@click.command()
@json_option
@run_cmd
def doctor(as_json):
    """Check binaries, ports and disk; report orphans and disk use per box."""
    from ..doctor import report

    out = report(get_host())
    checks, boxes, orphans = out["checks"], out["boxes"], out["orphans"]
    if as_json:
        emit_json(out)
    else:
        for c in checks:
            click.echo(f"{'ok ' if c['ok'] else 'BAD'}  {c['check']:<20} {c['detail']}")
        if boxes:
            table([[b["id"], b["state"], f"{b['bytes'] / 1e6:.1f} MB"] for b in boxes], ["BOX", "STATE", "DISK"])
        for box_id, what in orphans.items():
            click.echo(f"orphan {box_id}: {', '.join(what)} ('wtbox gc' removes it)")
        for name, layer in out["layers"].items():
            click.echo(f"{name:<8} {layer['count']} shared, {layer['bytes'] / 1e6:.1f} MB")
        for target in out["stray_mounts"]:
            click.echo(f"stray mount {target}: no box owns it ('wtbox gc' unmounts it)")
    sys.exit(0 if out["ok"] else 1)
