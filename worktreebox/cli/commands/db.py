"""`wtbox db start|stop|status`: the host's PostgreSQL (the embedded cluster, or the external server);
`wtbox db reset|psql|dump BOX`: one box's database."""
from __future__ import annotations

import click

from worktreebox.cli.build import command
from worktreebox.cli.commands._common import emit_json, get_host, info, json_option, run_cmd
from worktreebox.operations import admin, state


@click.group()
def db() -> None:
    """The host's PostgreSQL server that boxes get their databases from."""


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


@command(admin.DB_START)
def start(as_json: bool) -> None:
    st = admin.db_start(get_host())
    if as_json:
        emit_json(st)
    else:
        _print_status(st)


@command(admin.DB_STOP)
def stop(as_json: bool) -> None:
    st = admin.db_stop(get_host())
    if as_json:
        emit_json(st)
    else:
        info("stopped" if st["stopped"] else "was not running")


@command(admin.DB_STATUS)
def status(as_json: bool) -> None:
    st = admin.db_status(get_host())
    if as_json:
        emit_json(st)
    else:
        _print_status(st)


@command(state.DB_RESET)
def reset(box: str | None, as_json: bool) -> None:
    out = state.db_reset(get_host(), box)
    if as_json:
        emit_json(out)
    else:
        info(f"{out['id']}: database back to {out['from']} in {out['seconds'] * 1000:.0f} ms")


@command(state.DB_PSQL, json=False)
def psql(box: str | None) -> None:
    """Becomes psql (like `exec`): the terminal is psql's until it exits."""
    import os

    argv, env = state.db_psql(get_host(), box)
    os.execve(argv[0], argv, env)


@command(state.DB_DUMP)
def dump(box: str | None, file: str | None, fmt: str, as_json: bool) -> None:
    if file is None:  # the CLI alone: to stdout, for a pipe
        import os
        import subprocess
        import sys

        env, dbname = state.db_conninfo(get_host(), box)
        sys.stdout.flush()
        rc = subprocess.run([state.pg_tool("pg_dump"), f"--format={fmt}", "--no-owner", dbname],
                            env={**os.environ, **env}).returncode
        sys.exit(rc)
    out = state.db_dump(get_host(), box, file, fmt)
    if as_json:
        emit_json(out)
    else:
        info(f"wrote {out['file']} ({out['bytes']} bytes) in {out['seconds']:.2f}s")


for _cmd in (start, stop, status, reset, psql, dump):
    db.add_command(_cmd)


@db.command("drop-copies", hidden=True)
@click.argument("names", nargs=-1)
@click.option("--provider")
@run_cmd
def drop_copies(names: tuple[str, ...], provider: str | None) -> None:
    """Drop databases a restore or reset replaced (started in the background by them)."""
    from worktreebox.providers.postgres import boxcopy

    srv = get_host().database_server(provider)
    srv.application_name = "wtbox drop"
    for name in names:
        m = boxcopy.COPY_NAME.match(name)
        if m and m.group(2) == boxcopy.OUTGOING:  # never anything but a replaced box database
            boxcopy.drop_database(srv, name)


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
