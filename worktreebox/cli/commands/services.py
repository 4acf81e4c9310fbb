"""`wtbox up|down|restart BOX [SERVICE]`: control a box's services through its supervisor."""
from __future__ import annotations

import click

from worktreebox.cli.build import command
from worktreebox.cli.commands._common import emit_json, get_host, table
from worktreebox.operations import services


def _show(out: dict, as_json: bool) -> None:
    rows = out["services"]
    if as_json:
        emit_json(out)
        return
    table([[r["name"], r.get("state") or "", r.get("pid") or "", r.get("port") or "",
            "" if r.get("ready_seconds") is None else f"{r['ready_seconds']:.2f}s", str(r.get("restarts") or 0),
            r.get("error") or ""] for r in rows],
          ["SERVICE", "STATE", "PID", "PORT", "READY", "RESTARTS", "ERROR"])


SECRET = click.option(
    "--secret", "secrets", multiple=True,
    help="NAME (from your env) or NAME=@FILE, for a supervisor started anew (they are never stored).")


def _command(op):
    extras = [] if op.name == "down" else [SECRET]

    @command(op, extras=extras)
    def cmd(box, service, as_json, secrets=(), reload=False):
        from worktreebox.cli.commands.box import parse_secrets

        _show(op.perform(get_host(), box, service, reload, secrets=parse_secrets(secrets)), as_json)

    return cmd


up = _command(services.UP)
down = _command(services.DOWN)
restart = _command(services.RESTART)
