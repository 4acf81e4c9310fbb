"""gc, keep and unkeep."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from worktreebox.cli.build import command
from worktreebox.cli.commands._common import emit_json, get_host, info
from worktreebox.operations import boxes, fleet


def _timer_files() -> dict[str, str]:
    from worktreebox.operations.admin import template_path

    wtbox = Path(sys.executable).with_name("wtbox")
    exe = str(wtbox) if wtbox.exists() else f"{sys.executable} -m worktreebox.cli.main"
    home = str(get_host().home)
    out = {}
    for name in ("wtbox-gc.service", "wtbox-gc.timer", "wtbox-gc.cron"):
        out[name] = template_path(name).read_text().replace("@WTBOX@", exe).replace("@WTBOX_HOME@", home)
    return out


INSTALL_TIMER = click.option("--install-timer", is_flag=True, help="Install a systemd user timer that runs gc hourly.")
PRINT = click.option("--print", "print_only", is_flag=True,
                     help="With --install-timer: only print the unit files and cron line.")
QUIET = click.option("--quiet", is_flag=True, hidden=True)


@command(fleet.GC, extras=[INSTALL_TIMER, PRINT, QUIET])
def gc(dry_run, grace, spares, install_timer, print_only, quiet, as_json):
    if install_timer:
        files = _timer_files()
        if print_only:
            for name, text in files.items():
                click.echo(f"# --- {name}\n{text}")
            return
        unit_dir = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "systemd" / "user"
        unit_dir.mkdir(parents=True, exist_ok=True)
        for name in ("wtbox-gc.service", "wtbox-gc.timer"):
            (unit_dir / name).write_text(files[name])
        info(f"wrote {unit_dir}/wtbox-gc.{{service,timer}}; enable with: systemctl --user enable --now wtbox-gc.timer")
        return
    result = fleet.gc(get_host(), dry_run, grace, spares)
    if as_json:
        emit_json(result)
    elif not quiet:
        verb = "would" if dry_run else "did"
        for a in result["actions"]:
            failed = "" if dry_run or a.get("done") else "  FAILED"
            click.echo(f"{a['action']:<7} {a['id']}  ({a['reason']}){failed}")
        for target in result.get("mounts", []):
            click.echo(f"unmount {target}  (no box owns it)")
        for layer in result.get("layers", []):
            click.echo(f"remove  {layer}  (no box uses it)")
        for cgroup in result.get("cgroups", []):
            click.echo(f"remove  cgroup of box {cgroup}")
        for router in result.get("routers", []):
            click.echo(f"stop    {router}")
        if not any(result.get(k) for k in ("actions", "mounts", "layers", "cgroups", "routers")):
            info("nothing to clean")
        else:
            info(f"gc {verb} {len(result['actions'])} actions in {result['seconds']}s")
        for e in result["errors"]:
            info(f"error: {e}")
    if result["errors"]:
        sys.exit(1)


@command(boxes.KEEP)
def keep(box, as_json):
    _show_keep(boxes.KEEP.perform(get_host(), box), as_json)


@command(boxes.UNKEEP)
def unkeep(box, as_json):
    _show_keep(boxes.UNKEEP.perform(get_host(), box), as_json)


def _show_keep(out: dict, as_json: bool) -> None:
    if as_json:
        emit_json(out)
    else:
        info(f"{out['id']}: {'kept' if out['keep'] else 'no longer kept'}")
