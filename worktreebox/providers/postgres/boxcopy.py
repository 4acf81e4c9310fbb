"""Copies of a box's database: snapshots (`wt_<hex>_s_<token>`), and putting a copy in the box's
place (restore, `db reset`, a fork's database).

Every name starts with the box's `wt_<hex>_`, so `boxdb.drop` takes them with the box and gc can
tell whose they are. The rules PostgreSQL sets, and what follows:

- `CREATE DATABASE … TEMPLATE src` needs no other session on `src` for the whole copy. We end the
  box's sessions (`pg_terminate_backend(pid, timeout)`, which waits until they are gone) and the
  caller keeps the box frozen meanwhile, so nothing of it reconnects: that is the pause a snapshot
  reports. A new connection from outside the box waits on the copy's lock, it does not fail.
- A copy *into* the box's place is made first, under a temporary name, while the box runs on;
  then one transaction renames the box's database away and the copy in (a few ms, the box's
  sessions ended just before), and the old one is dropped. A kill at any moment leaves the box's
  database under its name (the transaction) and at most a stray `wt_<hex>_n_…`/`_o_…`, which gc drops.
- A snapshot's copy belongs to the superuser and takes no connections: the box cannot drop it
  or hold a session on it that would make a later copy of it fail.
"""
from __future__ import annotations

import contextlib
import re
import secrets
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from worktreebox.errors import WtboxError
from worktreebox.providers.postgres.boxdb import ident, sql_text

if TYPE_CHECKING:
    from worktreebox.providers.postgres.base import Server

SNAPSHOT, INCOMING, OUTGOING = "s", "n", "o"
COPY_NAME = re.compile(r"^(wt_[0-9a-f]{8})_([sno])_([0-9a-f]{6})$")
_TERMINATE_MS = 2000  # pg_terminate_backend waits this long for a session to be gone


def copy_name(pg_name: str, kind: str, token: str | None = None) -> str:
    return f"{pg_name}_{kind}_{token or secrets.token_hex(3)}"


def owner_of(name: str) -> str:
    """The box (its role's name) a database of boxes belongs to: its own, or one of its copies."""
    m = COPY_NAME.match(name)
    return m.group(1) if m else name


@contextlib.contextmanager
def owner_lock(conn: Any, box: str) -> Iterator[None]:
    """Held while the pg_database rows of one box's databases change (their owner, name, existence).
    PostgreSQL does not wait for a catalog row another session is changing, it fails ("tuple
    concurrently updated/deleted"): a fork lending its origin's databases (hand_to_box) met a
    background drop of that origin's replaced database. Advisory locks are per database: every
    holder takes it in the server's shared one."""
    key = f"wtbox:databases:{box}"
    conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (key,))
    try:
        yield
    finally:
        conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (key,))


def end_sessions(conn: Any, dbname: str) -> int:
    """End every session on `dbname` but ours and wait until they are gone; how many there were."""
    rows = conn.execute("SELECT pg_terminate_backend(pid, %s) FROM pg_stat_activity"
                        " WHERE datname = %s AND pid <> pg_backend_pid()", (_TERMINATE_MS, dbname)).fetchall()
    return len(rows)


def copy_database(conn: Any, source: str, target: str, *, owner: str | None = None, strategy: str | None = None,
                  end_source_sessions: bool = True) -> None:
    """`CREATE DATABASE target TEMPLATE source`, ending sessions on `source` first (and again if one
    slipped in). `strategy`: WAL_LOG or FILE_COPY (PostgreSQL 15+), as the golden copy measured."""
    import psycopg

    clause = f" STRATEGY {strategy}" if strategy and conn.info.server_version >= 150000 else ""
    statement = sql_text("CREATE DATABASE {d} TEMPLATE {t} OWNER {o}" + clause, d=ident(target), t=ident(source),
                         o=ident(owner or conn.info.user))
    for attempt in range(5):
        if end_source_sessions:
            end_sessions(conn, source)
        try:
            conn.execute(statement)
            return
        except psycopg.errors.ObjectInUse:
            if attempt == 4:
                raise WtboxError(f"Could not copy the database {source}: sessions outside the box kept "
                                 "reconnecting to it; close them (psql, an IDE) and try again.") from None


# Measured here (63 MB of rows, PostgreSQL 15, ext4): WAL_LOG 239 ms, FILE_COPY 141 ms; on an empty
# database WAL_LOG wins (FILE_COPY's two checkpoints cost more than the copy), which is what the golden
# copy measures. So a box's own data, past this size, is copied file by file.
FILE_COPY_FROM = 16 * 2**20


def strategy_for(conn: Any, source: str, measured: str | None) -> str | None:
    """How to copy `source`: FILE_COPY once it is large, else what the golden copy measured."""
    if conn.info.server_version < 150000:
        return None
    row = conn.execute("SELECT pg_database_size(%s)", (source,)).fetchone()
    return "FILE_COPY" if row and row[0] >= FILE_COPY_FROM else measured


def drop_later(home: Any, provider: str | None, names: list[str]) -> None:
    """Drop replaced databases after this command returns (a 60 MB DROP costs 80-240 ms here); a kill
    before they are dropped leaves them to gc (snapshots.sweep)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from worktreebox.system import procs

    env = {k: v for k, v in os.environ.items() if k not in ("WTBOX_ID", "WTBOX_BOX_DIR")}
    env["WTBOX_HOME"] = str(home)
    argv = [sys.executable, "-m", "worktreebox.cli.main", "db", "drop-copies", *names]
    if provider:
        argv += ["--provider", provider]
    try:
        procs.spawn_detached(["nice", "-n", "10", *argv], env=env, log_path=Path(os.devnull))
    except (OSError, subprocess.SubprocessError):
        pass  # gc drops them


def freeze_copy(conn: Any, name: str) -> None:
    """A snapshot's copy takes no sessions (a session on it would block every copy made from it)."""
    conn.execute(sql_text("ALTER DATABASE {d} ALLOW_CONNECTIONS false", d=ident(name)))
    conn.execute(sql_text("REVOKE CONNECT, TEMPORARY ON DATABASE {d} FROM PUBLIC", d=ident(name)))


def hand_to_box(srv: Server, name: str, role: str, *, reassign_from: str | None = None,
                shared_owner: str | None = None) -> None:
    """Make `name` the box's: owned by its role, no other role may connect, and every object that
    `reassign_from` owned in it (the golden role, or the box a fork was copied from) moved to `role`.

    REASSIGN OWNED also moves the old role's *shared* objects, its databases: when that role is a live
    box's (`shared_owner`), its databases are lent to the superuser for the one transaction and given
    back, so the box keeps its own database."""
    with srv.session(srv.shared_db) as conn:
        conn.execute(sql_text("ALTER DATABASE {d} OWNER TO {r}", d=ident(name), r=ident(role)))
        conn.execute(sql_text("ALTER DATABASE {d} ALLOW_CONNECTIONS true", d=ident(name)))
        conn.execute(sql_text("REVOKE CONNECT, TEMPORARY ON DATABASE {d} FROM PUBLIC", d=ident(name)))
    if not reassign_from or reassign_from == role:
        return
    # Forks made at once lend the same databases, and the lender's replaced databases may be being
    # dropped in the background: one at a time (owner_lock), around the other session's transaction.
    with (srv.session(srv.shared_db) as lock, owner_lock(lock, shared_owner or reassign_from),
          contextlib.closing(srv.connect(name)) as conn, conn.transaction()):
        lent = [r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE datdba = (SELECT oid FROM pg_roles WHERE rolname = %s)",
            (shared_owner,))] if shared_owner else []
        for db in lent:
            conn.execute(sql_text("ALTER DATABASE {d} OWNER TO {s}", d=ident(db), s=ident(conn.info.user)))
        conn.execute(sql_text("REASSIGN OWNED BY {g} TO {r}", g=ident(reassign_from), r=ident(role)))
        for db in lent:
            assert shared_owner is not None
            conn.execute(sql_text("ALTER DATABASE {d} OWNER TO {o}", d=ident(db), o=ident(shared_owner)))


def swap_in(srv: Server, box_db: str, incoming: str) -> tuple[float, str]:
    """Put the database `incoming` in `box_db`'s place; (the ms the box's sessions were cut for, the
    name the replaced one now has: the caller drops it once the box runs again)."""
    import psycopg

    outgoing = copy_name(box_db, OUTGOING)
    with srv.session(srv.shared_db) as conn, owner_lock(conn, owner_of(box_db)):
        for attempt in range(5):
            t0 = time.perf_counter()
            end_sessions(conn, box_db)
            try:
                with conn.transaction():
                    conn.execute(sql_text("ALTER DATABASE {d} RENAME TO {o}", d=ident(box_db), o=ident(outgoing)))
                    conn.execute(sql_text("ALTER DATABASE {n} RENAME TO {d}", n=ident(incoming), d=ident(box_db)))
                break
            except psycopg.errors.ObjectInUse:
                if attempt == 4:
                    raise WtboxError(f"Could not replace the database {box_db}: sessions outside the box kept "
                                     "reconnecting to it; close them and try again.") from None
    return (time.perf_counter() - t0) * 1000, outgoing


def drop_database(srv: Server, name: str) -> None:
    with srv.session(srv.shared_db) as conn, owner_lock(conn, owner_of(name)):
        conn.execute(sql_text("DROP DATABASE IF EXISTS {d} WITH (FORCE)", d=ident(name)))


def exists(srv: Server, name: str) -> bool:
    with srv.session(srv.shared_db) as conn:
        return bool(conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone())


def copies(srv: Server) -> list[str]:
    """Every snapshot and half-swapped copy on the server (for gc)."""
    with srv.session(srv.shared_db) as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE datname ~ '^wt_[0-9a-f]{8}_[sno]_[0-9a-f]{6}$'")
        return sorted(r[0] for r in rows)


def size_bytes(srv: Server, name: str) -> int:
    with srv.session(srv.shared_db) as conn:
        row = conn.execute("SELECT pg_database_size(%s)", (name,)).fetchone()
        return int(row[0]) if row else 0
