"""Operations on a box's own state: snapshot, restore, fork, and its database (db reset, db psql,
db dump). README, "State", has the picture; fleet/snapshots.py, restore.py and fork.py do the work."""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from worktreebox.errors import ParamError
from worktreebox.operations.spec import BOX, CHANGES, DESTROYS, REQUIRED, SHOW_SECRETS, Operation, Param, parsed

if TYPE_CHECKING:
    from worktreebox.host import Host


def snapshot(host: Host, box: str | None, name: str | None = None, list_: bool = False,
             rm: str | None = None) -> dict[str, Any]:
    """Take snapshot NAME of BOX; or list its snapshots; or remove one."""
    from worktreebox.fleet import snapshots

    if sum(bool(x) for x in (name, list_, rm)) > 1:
        raise ParamError("Give one of {name}, {list_} and {rm}.", "name", "list_", "rm")
    b = host.get(box)
    if list_:
        return {"id": b.id, "snapshots": [s.to_json() for s in snapshots.shown(b)]}
    if rm:
        return snapshots.remove(host, b, rm)
    host.registry.touch(b.id)
    return {"id": b.id, **snapshots.take(host, b, name).to_json()}


def restore(host: Host, box: str | None, name: str) -> dict[str, Any]:
    from worktreebox.fleet import restore as R

    b = host.get(box)
    host.registry.touch(b.id)
    return R.restore(host, b, name)


def fork(host: Host, box: str | None, n: int = 1, task: str | None = None, from_snapshot: str | None = None,
         ttl: str | None = None, no_pool: bool = False, show_secrets: bool = False, *,
         progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """N boxes from BOX's current state (or its snapshot); each as `wtbox status` shows it."""
    from worktreebox.config.load import parse_duration
    from worktreebox.fleet import fork as F

    ttl_s = parsed("ttl", parse_duration, ttl, positive=True) if ttl is not None else None
    if n < 1:
        raise ParamError("{n} must be at least 1.", "n")
    b = host.get(box)
    host.registry.touch(b.id)
    t0 = time.perf_counter()
    made = F.fork(host, b, n, task, from_snapshot, progress=progress, ttl=ttl_s, use_pool=not no_pool)
    seconds = round(time.perf_counter() - t0, 3)
    return [{**host.describe(x, show_secrets=show_secrets), "fork": x.data.get("fork"), "seconds": seconds,
             "from_pool": bool(x.data.get("pool_id"))} for x in made]


def db_reset(host: Host, box: str | None) -> dict[str, Any]:
    from worktreebox.fleet import restore as R

    return R.db_reset(host, host.get(box))


def db_conninfo(host: Host, box: str | None) -> tuple[dict[str, str], str]:
    """(libpq variables of the box's own role, its database name) for psql and pg_dump."""
    from worktreebox.errors import WtboxError

    b = host.get(box)
    db = b.data.get("database") or {}
    if not db or db.get("mode") == "none":
        raise WtboxError(f"{b.id} has no database ([database] mode = \"none\").")
    names = ("PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE")
    env: dict[str, str] = {k: b.env[k] for k in names if k in b.env}
    if db.get("url"):  # where the host reaches it (a sandboxed box's env names its own 127.0.0.1:5432)
        from urllib.parse import urlsplit

        at = urlsplit(db["url"])
        env.update({"PGHOST": at.hostname or env.get("PGHOST", ""), "PGPORT": str(at.port or env.get("PGPORT", ""))})
    if db.get("mode") == "schema":
        env["PGOPTIONS"] = f"-c search_path={db['schema']},public"
    return env, db["name"]


def pg_tool(name: str) -> str:
    """psql / pg_dump: on PATH, else beside the embedded cluster's pg_ctl."""
    import shutil

    from worktreebox.errors import WtboxError

    found = shutil.which(name)
    if found:
        return found
    from worktreebox.providers.postgres.embedded import find_bin_dir

    candidate = find_bin_dir() / name
    if not candidate.exists():
        raise WtboxError(f"{name} is not installed; install the PostgreSQL client "
                         "('apt-get install postgresql-client').")
    return str(candidate)


def db_psql(host: Host, box: str | None) -> tuple[list[str], dict[str, str]]:
    """argv and environment of a psql session as the box's role (the CLI replaces itself with it)."""
    env, _ = db_conninfo(host, box)
    return [pg_tool("psql")], {**os.environ, **env}


def db_dump(host: Host, box: str | None, file: str | None = None, fmt: str = "plain") -> dict[str, Any]:
    """pg_dump of the box's database (as its role) into FILE."""
    import subprocess

    from worktreebox.errors import WtboxError

    if not file:
        raise ParamError("{file} is needed: where to write the dump.", "file")
    env, dbname = db_conninfo(host, box)
    t0 = time.perf_counter()
    proc = subprocess.run([pg_tool("pg_dump"), f"--format={fmt}", "--no-owner", "--file", file, dbname],
                          env={**os.environ, **env}, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise WtboxError(f"pg_dump failed: {lines[-1] if lines else proc.returncode}.")
    return {"file": os.path.abspath(file), "bytes": os.path.getsize(file), "format": fmt,
            "seconds": round(time.perf_counter() - t0, 3)}


SNAPSHOT = Operation(
    "snapshot", "Freeze BOX's own state as snapshot NAME: its worktree changes, index, branch tip, database "
                "content and running services (the box is paused for the copy).",
    (BOX,
     Param("name", "Name of the snapshot (default snap-<n>).", positional=True),
     Param("list_", "List the box's snapshots.", bool, False, flags=("--list",)),
     Param("rm", "Remove snapshot NAME.", metavar="NAME")),
    snapshot, result="{id, name, tip, services, paused_ms, files_bytes, database: {copy, bytes}, seconds}; "
                     "with list_: {id, snapshots}; with rm: {box, removed}.",
    effect=CHANGES, tool="box_snapshot")

RESTORE = Operation(
    "restore", "Put BOX back to snapshot NAME: files, index, branch and data; its services running and ready.",
    (BOX, Param("name", "The snapshot.", default=REQUIRED, positional=True)),
    restore, result="{id, snapshot, files_restored, services_restarted, services, copy_ms, paused_ms, seconds}.",
    effect=DESTROYS, tool="box_restore")

FORK = Operation(
    "fork", "Make N new boxes that start from BOX's current state (or its snapshot): its files, committed and "
            "not, its data, commit and layers; each on its own branch, ports, database; services ready.",
    (BOX,
     Param("n", "How many forks.", int, 1, flags=("-n",), min=1, max=64),
     Param("task", "Task name of the forks (default: BOX's task + -fork; numbered when n > 1)."),
     Param("from_snapshot", "Start from this snapshot of BOX instead of its current state.",
           flags=("--from",), metavar="SNAPSHOT"),
     Param("ttl", "Remove after this long without use (e.g. 8h); default [box] ttl."),
     Param("no_pool", "Never take a box of the warm pool (used when BOX's files are its commit's: then only "
                      "the data is put in, and its services are up already).", bool, False),
     SHOW_SECRETS),
    fork, list[dict[str, Any]], "One entry per fork, as `wtbox status` shows it, plus fork: {from, snapshot, tip} "
                                "and from_pool.",
    effect=CHANGES, tool="box_fork")

DB_RESET = Operation(
    "db reset", "Put BOX's database back to the migrated golden copy (its services' sessions are cut once).",
    (BOX,), db_reset, result="{id, mode, from, spare, paused_ms, seconds}.", effect=DESTROYS, tool="db_reset")

DB_PSQL = Operation("db psql", "Open psql on BOX's database as the box's own role.", (BOX,), db_psql,
                    effect=CHANGES)

DB_DUMP = Operation(
    "db dump", "pg_dump of BOX's database (as the box's role) into FILE (the CLI: stdout without FILE).",
    (BOX, Param("file", "Where to write the dump.", positional=True),
     Param("fmt", "pg_dump's format.", default="plain", choices=("plain", "custom"), flags=("--format",))),
    db_dump, result="{file, bytes, format, seconds}.", tool="db_dump")
