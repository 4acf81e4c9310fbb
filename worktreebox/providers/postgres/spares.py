"""Spare databases: ready-made copies of a box database, so `new` renames one instead of waiting
while PostgreSQL copies files.

Copying a database (`CREATE DATABASE … TEMPLATE`, even of the empty template1) writes several
MB and costs 50 ms on a quiet disk, a few hundred ms on a busy one, and five at once queue
behind each other. A spare is made ahead, in the background, after a box took one:

    wt_spare_<key>_<8 hex>    key: the golden copy's hash, or "empty" (nothing to migrate)

Claiming one is a rename (`ALTER DATABASE … RENAME`, under an advisory lock per spare) plus an
owner change: a few ms. A kill at any moment leaves either a spare (still a spare) or the box's
database under the box's name (gc's usual orphan). Spares of a golden copy that went stale are
dropped with it; `[database] spares = 0` in the host config turns them off.
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

from worktreebox.system import procs

PREFIX = "wt_spare_"
EMPTY = "empty"


def _like(key: str) -> str:
    """The LIKE pattern of the spares of `key` (underscores escaped: they are LIKE's wildcard)."""
    return f"{PREFIX}{key}_".replace("_", "\\_") + "%"


def claim(conn: Any, key: str, name: str) -> bool:
    """Rename one spare of `key` to `name`; False when there is none to take."""
    import psycopg

    for _attempt in range(3):
        try:
            with conn.transaction():
                for (spare,) in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY datname",
                                             (_like(key),)).fetchall():
                    if conn.execute("SELECT pg_try_advisory_xact_lock(hashtext(%s))", (spare,)).fetchone()[0]:
                        conn.execute(_sql("ALTER DATABASE {s} RENAME TO {d}", s=spare, d=name))
                        return True
                return False
        except (psycopg.errors.InvalidCatalogName, psycopg.errors.ObjectInUse):
            continue  # another box took it between our read and our lock: try the next one
    return False


def count(conn: Any, key: str) -> int:
    return conn.execute("SELECT count(*) FROM pg_database WHERE datname LIKE %s", (_like(key),)).fetchone()[0]


def refill(srv: Any, key: str, template: str, strategy: str | None, want: int) -> int:
    """Make spares of `key` (copies of `template`) until `want` exist; returns how many were made."""
    made = 0
    with srv.session(srv.shared_db) as conn:
        while count(conn, key) < want:
            name = f"{PREFIX}{key}_{secrets.token_hex(4)}"
            clause = f" STRATEGY {strategy}" if strategy and conn.info.server_version >= 150000 else ""
            conn.execute(_sql("CREATE DATABASE {d} TEMPLATE {t}" + clause, d=name, t=template))
            # no session may open it: a spare becomes a box's database, which only the box may enter
            conn.execute(_sql("REVOKE CONNECT, TEMPORARY ON DATABASE {d} FROM PUBLIC", d=name))
            made += 1
    return made


def refill_later(home: Path, provider: str | None, key: str, template: str, strategy: str | None, want: int) -> None:
    """Start `wtbox db refill` detached and niced: the spares are made after this command returns."""
    if want <= 0:
        return
    env = {k: v for k, v in os.environ.items() if k not in ("WTBOX_ID", "WTBOX_BOX_DIR")}
    env["WTBOX_HOME"] = str(home)
    argv = [sys.executable, "-m", "worktreebox.cli.main", "db", "refill", "--key", key, "--template", template,
            "--count", str(want)]
    if provider:
        argv += ["--provider", provider]
    if strategy:
        argv += ["--strategy", strategy]
    try:
        # detached (a grandchild): a long-lived caller (`wtbox mcp`, a test) never holds it as a zombie
        procs.spawn_detached(["nice", "-n", "10", *argv], env=env, log_path=Path(os.devnull))
    except (OSError, subprocess.SubprocessError):
        pass  # no spare: the next box copies its own database, as without spares


def drop(conn: Any, key: str) -> None:
    """Drop the spares of `key` (their golden copy went stale)."""
    for (spare,) in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (_like(key),)).fetchall():
        conn.execute(_sql("DROP DATABASE IF EXISTS {d} WITH (FORCE)", d=spare))


def _sql(text: str, **names: str):
    from psycopg import sql

    return sql.SQL(text).format(**{k: sql.Identifier(v) for k, v in names.items()})
