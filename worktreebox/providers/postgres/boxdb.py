"""What a box owns on a PostgreSQL server (its role, schema or databases): tagged with the host
that made it, prepared once per database, and dropped whole.

Shared by the database resource and the golden copies (golden.py); psycopg is imported in the
functions, as everywhere: `wtbox ls` must not pay for it.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worktreebox.errors import WtboxError

if TYPE_CHECKING:
    from worktreebox.providers.postgres.base import Server

# Per process: (server key, database) pairs whose public schema and extensions were checked.
_PREPARED: set[tuple[str, str, tuple[str, ...]]] = set()


def ident(name: str) -> Any:
    from psycopg import sql

    return sql.Identifier(name)


def sql_text(text: str, **parts: Any) -> Any:
    from psycopg import sql

    return sql.SQL(text).format(**parts)


def owner_tag(home: Path | str) -> str:
    """COMMENT on a box role naming the wtbox host that made it (servers may be shared by hosts)."""
    import socket

    return json.dumps({"wtbox_home": str(home), "hostname": socket.gethostname()}, sort_keys=True)



def prepare_database(srv: Server, dbname: str, extensions: list[str]) -> None:
    """Once per database: nobody but the owner creates in public; listed extensions exist in public."""
    key = (srv.key(), dbname, tuple(sorted(extensions)))
    if key in _PREPARED:
        return
    with srv.session(dbname) as conn:
        public_can_create = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace n,"
            " aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) a"
            " WHERE n.nspname = 'public' AND a.grantee = 0 AND a.privilege_type = 'CREATE')"
        ).fetchone()[0]  # type: ignore[index]  # SELECT EXISTS: one row
        have = {r[0] for r in conn.execute("SELECT extname FROM pg_extension")}
        missing = [e for e in extensions if e not in have]
        if public_can_create or missing:
            # Concurrent GRANT/REVOKE or CREATE EXTENSION on one object fail; serialise them.
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext('wtbox:prepare-database'))")
                if public_can_create:
                    conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
                create_extensions(conn, missing)
    _PREPARED.add(key)


def create_extensions(conn: Any, extensions: list[str]) -> None:
    import psycopg

    for ext in extensions:
        try:
            with conn.transaction():
                conn.execute(sql_text("CREATE EXTENSION IF NOT EXISTS {e} SCHEMA public", e=ident(ext)))
        except psycopg.Error as e:
            raise WtboxError(f"[database] extensions: cannot create the extension {ext!r}: "
                             f"{str(e).strip().splitlines()[0]}.") from None



def drop(srv: Server, role: str) -> None:
    """Terminate the role's sessions, drop its databases, schema and the role; fine if gone."""
    import psycopg

    with srv.session(srv.shared_db) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                     " WHERE usename = %s AND pid <> pg_backend_pid()", (role,))
        dbs = [r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE datname = %s"
            " OR datdba = (SELECT oid FROM pg_roles WHERE rolname = %s)"
            " OR datname LIKE %s", (role, role, role.replace("_", "\\_") + "\\_%"))]  # its snapshots (boxcopy.py)
        for db in dbs:
            conn.execute(sql_text("DROP DATABASE IF EXISTS {d} WITH (FORCE)", d=ident(db)))
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        with conn.transaction():
            conn.execute(sql_text("DROP SCHEMA IF EXISTS {s} CASCADE", s=ident(role)))
            if exists:
                conn.execute(sql_text("DROP OWNED BY {r}", r=ident(role)))
        if not exists:
            return
        try:
            conn.execute(sql_text("DROP ROLE IF EXISTS {r}", r=ident(role)))
            return
        except psycopg.errors.DependentObjectsStillExist:
            # Objects in other databases (e.g. a table the box made in `postgres`): drop them there.
            others = [r[0] for r in conn.execute(
                "SELECT DISTINCT d.datname FROM pg_shdepend s JOIN pg_database d ON d.oid = s.dbid"
                " WHERE s.refobjid = (SELECT oid FROM pg_roles WHERE rolname = %s)", (role,))]
    for db in others:
        with contextlib.closing(srv.connect(db)) as other:
            other.execute(sql_text("DROP OWNED BY {r}", r=ident(role)))
    with srv.session(srv.shared_db) as conn:
        conn.execute(sql_text("DROP ROLE IF EXISTS {r}", r=ident(role)))

