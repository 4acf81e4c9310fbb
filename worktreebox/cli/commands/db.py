"""`wtbox db start|stop|status`: the host's PostgreSQL (the embedded cluster, or the external server)."""
from __future__ import annotations

import click

from worktreebox.cli.commands._common import emit_json, get_host, info, json_option, run_cmd


@click.group()
def db() -> None:
    """The host's PostgreSQL server that boxes get their databases from."""


def _server():
    return get_host().database_server()


def _print_status(st: dict) -> None:
    if st.get("running"):
        state = "running"
    elif st["provider"] == "external":
        state = "unreachable"
    elif st.get("initialised") is False:
        state = "not initialised (starts on first need)"
    else:
        state = "stopped"
    click.echo(f"{'postgres':<11}{st['provider']}, {state}")
    for key in ("url", "data_dir", "socket_dir", "host", "port", "version", "pid", "os_user", "error"):
        if st.get(key) not in (None, ""):
            click.echo(f"{key:<11}{st[key]}")


@db.command()
@json_option
@run_cmd
def start(as_json: bool) -> None:
    """Start the host's PostgreSQL (initdb on first use); no-op if it runs."""
    srv = _server()
    srv.ensure_running()
    st = srv.status()
    if as_json:
        emit_json(st)
    else:
        _print_status(st)


@db.command()
@json_option
@run_cmd
def stop(as_json: bool) -> None:
    """Stop the host's cluster or container (boxes keep their data; it starts again on next need)."""
    srv = _server()
    was_running = srv.stop()  # an external server refuses: wtbox does not stop it
    st = {**srv.status(), "stopped": was_running}
    if as_json:
        emit_json(st)
    else:
        info("stopped" if was_running else "was not running")


@db.command()
@json_option
@run_cmd
def status(as_json: bool) -> None:
    """Whether the server runs, where, and on which port (never starts it)."""
    st = _server().status()
    if as_json:
        emit_json(st)
    else:
        _print_status(st)


@db.command(hidden=True)
@click.option("--key", required=True)
@click.option("--template", required=True)
@click.option("--count", "want", type=int, required=True)
@click.option("--provider")
@click.option("--strategy")
@json_option
@run_cmd
def refill(key: str, template: str, want: int, provider: str | None, strategy: str | None, as_json: bool) -> None:
    """Make spare databases ahead (started in the background by `new`; one at a time per key)."""
    from worktreebox.providers.postgres.spares import refill as make
    from worktreebox.system.fsutil import LockBusy, file_lock

    host = get_host()
    made = 0
    try:
        with file_lock(host.home / f"postgres.spares.{key}.lock", timeout=0, what="the spare databases' lock"):
            srv = host.database_server(provider)
            srv.application_name = "wtbox spares"  # not one of the sessions of a box's `new`
            made = make(srv, key, template, strategy, want)
    except LockBusy:
        pass  # another refill of this key runs now
    if as_json:
        emit_json({"key": key, "made": made})
