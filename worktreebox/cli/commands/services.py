"""`wtbox up|down|restart BOX [SERVICE]`: control a box's services through its supervisor."""
from __future__ import annotations

import click

from worktreebox.cli.commands._common import box_argument, emit_json, get_host, json_option, run_cmd, table


def _show(box_id: str, services: dict, as_json: bool) -> None:
    rows = [{"name": n, **s} for n, s in services.items()]
    if as_json:
        emit_json({"id": box_id, "box": box_id, "services": rows})  # "box": alias for one release
        return
    table([[r["name"], r.get("state") or "", r.get("pid") or "", r.get("port") or "",
            "" if r.get("ready_seconds") is None else f"{r['ready_seconds']:.2f}s", r.get("restarts") or 0,
            r.get("error") or ""] for r in rows],
          ["SERVICE", "STATE", "PID", "PORT", "READY", "RESTARTS", "ERROR"])


def _command(action: str, doc: str):
    @click.command(name=action, help=doc)
    @box_argument
    @click.argument("service", required=False)
    @json_option
    @run_cmd
    def cmd(box, service, as_json, secrets=()):
        from worktreebox.cli.commands.box import parse_secrets

        host = get_host()
        b = host.get(box)
        _show(b.id, host.services(b, action, service, parse_secrets(secrets)), as_json)

    if action != "down":
        cmd = click.option(
            "--secret", "secrets", multiple=True,
            help="NAME (from your env) or NAME=@FILE, for a supervisor started anew (they are never stored).")(cmd)
    return cmd


up = _command("up", "Start the box's services (or one SERVICE) and wait until they are ready.")
down = _command("down", "Stop the box's services (or one SERVICE): SIGTERM, wait, SIGKILL.")
restart = _command("restart", "Restart the box's services (or one SERVICE) and wait until they are ready.")
