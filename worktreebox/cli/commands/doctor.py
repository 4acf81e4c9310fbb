"""`wtbox doctor`: what is installed, what is missing, disk per box, what leaked (fleet/doctor.py),
plus the CLI's own line: whether this home's CLI server runs."""
from __future__ import annotations

import sys
from typing import Any

import click

from worktreebox.cli import protocol as cliproto
from worktreebox.cli.build import command
from worktreebox.cli.commands._common import emit_json, get_host, table
from worktreebox.operations import admin


@command(admin.DOCTOR)
def doctor(as_json):
    host = get_host()
    out = admin.doctor(host, [_check_cli_server(host)])
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


def _check_cli_server(host) -> dict:
    """Informational: served commands are fast when it runs, and run in process (slower) when not."""
    if cliproto.turned_off():
        return {"check": "cli server", "ok": True, "detail": "off (WTBOX_NO_SERVER is set)"}
    st = cliproto.ask(str(host.home), "status")
    detail = (f"running (pid {st['pid']}, {st['served']} commands served)" if st
              else "not running (the next served command starts one)")
    return {"check": "cli server", "ok": True, "detail": detail}


def docker_report(host: Any = None) -> dict[str, Any]:
    """Availability, reason, images present, and which docker providers are usable (never starts anything)."""
    if host is None:
        from worktreebox.cli.commands._common import get_host

        host = get_host()
    return host.docker_report()
