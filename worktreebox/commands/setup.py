"""Host-level commands: init (starter wtbox.toml) and doctor (what is missing, what leaked)."""
from __future__ import annotations

import os
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


def _check_binaries(host) -> list[dict]:
    checks = []
    git = shutil.which("git")
    checks.append({"check": "git", "ok": bool(git), "detail": git or "missing: apt-get install git"})
    checks += host.backend_checks()  # PostgreSQL, VictoriaMetrics
    vector = shutil.which("vector")
    checks.append({"check": "vector (optional)", "ok": True,
                   "detail": vector or "not installed; the built-in collector is used"})
    return checks


def _check_ports(host) -> dict:
    from ..resources.ports import default_range, ephemeral_range, is_port_free

    lo, hi = host.config.port_range or default_range()
    eph = ephemeral_range()
    leased = host.registry.leased_ports()
    sample = range(lo, min(hi, lo + 200) + 1)
    busy = sum(1 for p in sample if p not in leased and not is_port_free(p))
    ok = hi < eph[0] or lo > eph[1]
    return {"check": "port range", "ok": ok and busy < len(sample),
            "detail": f"{lo}-{hi} ({len(leased)} leased, {busy} of the first {len(sample)} busy elsewhere; "
                      f"kernel ephemeral range {eph[0]}-{eph[1]}{'' if ok else ' OVERLAPS'})"}


def _check_disk(host) -> dict:
    target = host.home if host.home.exists() else host.home.parent
    while not target.exists():
        target = target.parent
    usage = shutil.disk_usage(target)
    free_gb = usage.free / 1e9
    return {"check": "disk", "ok": free_gb > 2, "detail": f"{free_gb:.1f} GB free under {target}"}


def _dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


@click.command()
@json_option
@run_cmd
def doctor(as_json):
    """Check binaries, ports and disk; report orphans and disk use per box."""
    host = get_host()
    checks = _check_binaries(host) + [_check_ports(host), _check_disk(host)]
    from .doctor_docker import docker_report

    d = docker_report(host)
    checks.append({"check": "docker", "ok": d["ok"], "detail": d["summary"]})
    boxes = [{"id": b.id, "state": b.state, "bytes": _dir_size(b.dir)} for b in host.list()]
    from ..gc import find_orphans

    orphans = find_orphans(host)
    out = {"home": str(host.home), "checks": checks, "boxes": boxes, "orphans": orphans,
           "ok": all(c["ok"] for c in checks)}
    if as_json:
        emit_json(out)
    else:
        for c in checks:
            click.echo(f"{'ok ' if c['ok'] else 'BAD'}  {c['check']:<20} {c['detail']}")
        if boxes:
            table([[b["id"], b["state"], f"{b['bytes'] / 1e6:.1f} MB"] for b in boxes], ["BOX", "STATE", "DISK"])
        for box_id, what in orphans.items():
            click.echo(f"orphan {box_id}: {', '.join(what)} ('wtbox gc' removes it)")
    sys.exit(0 if out["ok"] else 1)
