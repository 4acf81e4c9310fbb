"""`wtbox net BOX [faults]` and `wtbox expose BOX PORT`: a sandboxed box's network while it runs."""
from __future__ import annotations

import click

from worktreebox.cli.build import command
from worktreebox.cli.commands._common import emit_json, get_host, table
from worktreebox.operations import network


@command(network.NET)
def net(box, delay, jitter, loss, down, reset, target, as_json):
    out = network.net(get_host(), box, delay, jitter, loss, down, reset, target)
    if as_json:
        emit_json(out)
        return
    show_network(out)


def show_network(out: dict) -> None:
    """Each forward with its faults, and outbound traffic (also what `status` shows)."""
    rows = [[name, f["listen"], f["target"], _faults(f["faults"]), f["open"]] for name, f in out["forwards"].items()]
    table(rows, ["FORWARD", "LISTEN", "TO", "FAULTS", "OPEN"])
    outbound = out["outbound"]
    click.echo("outbound " + _faults({"down": outbound["down"], "loss": outbound["loss"]}))


def _faults(f: dict) -> str:
    parts = [f"{k.removesuffix('_ms')} {v:g}ms" for k, v in f.items() if k.endswith("_ms") and v]
    parts += [f"loss {f['loss']:.0%}"] if f.get("loss") else []
    parts += ["DOWN"] if f.get("down") else []
    return ", ".join(parts) or "-"


@command(network.EXPOSE)
def expose(box, port, host_port, release, as_json):
    out = network.expose(get_host(), box, port, host_port, release)
    if as_json:
        emit_json(out)
        return
    for fixed, name in out["exposed"].items():
        click.echo(f"127.0.0.1:{fixed} -> {out['id']} {name}")
    if not out["exposed"]:
        click.echo(f"nothing of {out['id']} is exposed")
