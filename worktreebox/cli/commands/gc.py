"""gc, keep and unkeep."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from worktreebox.cli.commands._common import box_argument, emit_json, get_host, info, json_option, run_cmd
from worktreebox.config.load import parse_duration


def _timer_files() -> dict[str, str]:
    from worktreebox.cli.commands.init import template_path

    wtbox = Path(sys.executable).with_name("wtbox")
    exe = str(wtbox) if wtbox.exists() else f"{sys.executable} -m worktreebox.cli.main"
    home = str(get_host().home)
    out = {}
    for name in ("wtbox-gc.service", "wtbox-gc.timer", "wtbox-gc.cron"):
        out[name] = template_path(name).read_text().replace("@WTBOX@", exe).replace("@WTBOX_HOME@", home)
    return out


@click.command()
@click.option("--dry-run", is_flag=True, help="Print what would be removed and why; change nothing.")
@click.option("--grace", default="10m", show_default=True,
              help="Leave boxes in creating/removing alone for this long (their command may still run).")
@click.option("--install-timer", is_flag=True, help="Install a systemd user timer that runs gc hourly.")
@click.option("--print", "print_only", is_flag=True, help="With --install-timer: only print the unit files and cron line.")
@click.option("--quiet", is_flag=True, hidden=True)
@json_option
@run_cmd
def gc(dry_run, grace, install_timer, print_only, quiet, as_json):
    """Remove orphans, crashed half-boxes and boxes whose TTL expired."""
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
    from worktreebox.fleet import gc as gc_mod

    grace_s = parse_duration(grace, where="--grace")
    result = gc_mod.run(get_host(), grace=grace_s, dry_run=dry_run)
    if as_json:
        emit_json(result)
    elif not quiet:
        verb = "would" if dry_run else "did"
        for a in result["actions"]:
            click.echo(f"{a['action']:<7} {a['id']}  ({a['reason']})" + ("" if dry_run or a.get("done") else "  FAILED"))
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


@click.command()
@box_argument
@json_option
@run_cmd
def keep(box, as_json):
    """Mark a box so gc never removes it."""
    _set_keep(box, True, as_json)


@click.command()
@box_argument
@json_option
@run_cmd
def unkeep(box, as_json):
    """Let gc remove the box again when its TTL expires."""
    _set_keep(box, False, as_json)


def _set_keep(ref, value: bool, as_json: bool) -> None:
    host = get_host()
    b = host.get(ref)
    host.registry.set_keep(b.id, value)
    b.keep = value
    if as_json:
        emit_json(b.to_json())
    else:
        info(f"{b.id}: {'kept' if value else 'no longer kept'}")
