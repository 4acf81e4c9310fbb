"""`wtbox server status|stop`: this home's CLI server (cliserver.py); always run in process."""
from __future__ import annotations

import os
import time

import click

from worktreebox.cli import protocol as cliproto
from worktreebox.cli.commands._common import emit_json, info, json_option, run_cmd
from worktreebox.settings import default_home


def _home() -> str:
    return os.path.abspath(default_home())


@click.group()
def server() -> None:
    """The CLI server that runs served commands without Python's start-up (one per home)."""


@server.command()
@json_option
@run_cmd
def status(as_json: bool) -> None:
    """Whether a CLI server runs for this home: pid, since when, commands served."""
    home = _home()
    st = cliproto.ask(home, "status")
    if as_json:
        emit_json({"running": st is not None, "home": home, **({k: st[k] for k in ("pid", "since", "served", "idle_s")}
                                                                 if st else {})})
    elif st is None:
        click.echo(f"no CLI server for {home} (the next served command starts one)")
    else:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st["since"]))
        click.echo(f"running  pid {st['pid']}  since {since}  served {st['served']}  home {home}")


@server.command()
@json_option
@run_cmd
def stop(as_json: bool) -> None:
    """Stop this home's CLI server (the next served command starts a fresh one)."""
    home = _home()
    st = cliproto.ask(home, "status")
    pid = st["pid"] if st is not None else None
    stopped = st is not None and cliproto.ask(home, "stop") is not None
    if stopped:
        from worktreebox.system import procs

        procs.wait_gone([pid], timeout=5)
    if as_json:
        emit_json({"stopped": stopped, "pid": pid, "home": home})
    else:
        info(f"stopped the CLI server (pid {pid})." if stopped else f"no CLI server runs for {home}.")

