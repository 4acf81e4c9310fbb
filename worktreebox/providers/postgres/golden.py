"""Golden databases (database mode): one migrated copy per repo and migration state, which each
box's database is cloned from (`CREATE DATABASE … TEMPLATE`), and the migrations run to make it.

The golden copy is migrated in a box's own tree (its dependency layers and [setup] done), once
per migration hash on this host (a file lock per hash); a new state drops the old one and its
spares. Each copy records the clone strategy measured fastest for it (WAL_LOG or FILE_COPY).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worktreebox.errors import WtboxError
from worktreebox.providers.postgres import spares as dbspares
from worktreebox.providers.postgres.boxdb import create_extensions, ident, sql_text
from worktreebox.system import cgroups
from worktreebox.system.fsutil import file_lock

if TYPE_CHECKING:
    from worktreebox.providers.postgres.base import Server

GOLDEN_PREFIX = "wt_golden_"
STRATEGIES = ("WAL_LOG", "FILE_COPY")
MIGRATE_TIMEOUT = 600.0  # [database] timeout's default (config/repo.py says so too)
_LAST_LINES = 10


class Golden:
    """The migrated database that boxes of one repo and one migration state are cloned from."""

    def __init__(self, srv: Server, home: Path, repo: str, base_sha: str, migrate: str | None,
                 globs: list[str], extensions: list[str], env: Callable[[dict[str, Any]], dict[str, str]],
                 logs_dir: Path, redact: list[str], timeout: float = MIGRATE_TIMEOUT, *,
                 seen_at: tuple[str, int] | None = None, launcher: Any = None) -> None:
        self.srv, self.home, self.repo, self.base_sha = srv, home, repo, base_sha
        self.timeout = timeout
        # where the migration (run as a process of the box, `launcher`) reaches the server
        self.seen_at, self.launcher = seen_at or (srv.box_host, srv.box_port), launcher
        self.migrate, self.globs, self.extensions = migrate, globs, extensions
        self._env, self.logs_dir, self.redact = env, logs_dir, redact
        self.hash = migrations_hash(repo, base_sha, migrate, globs, extensions)
        self.name = GOLDEN_PREFIX + self.hash
        self._strategy: str | None = None

    @property
    def needed(self) -> bool:
        """Without migrations or extensions there is nothing to copy: a box gets a new, empty database."""
        return bool(self.migrate or self.extensions)

    def ready(self) -> bool:
        with self.srv.session(self.srv.shared_db) as conn:
            return self.exists(conn)

    def exists(self, conn: Any) -> bool:
        return bool(conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.name,)).fetchone())

    def ensure(self, tree: Path, cgroup: cgroups.Leaf | None = None) -> None:
        """Build the golden database unless it exists, migrating it in `tree` (a box's worktree with its
        dependency layers and [setup] done); one build per hash at a time on this host."""
        if self.ready():
            return
        with file_lock(self.home / f"postgres.{self.name}.lock", what=f"the build lock of {self.name}"):
            if self.ready():
                return
            self._build(tree, cgroup)

    def strategy(self, conn: Any) -> str:
        if self._strategy is None:
            row = conn.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                               (self.name,)).fetchone()
            try:
                self._strategy = json.loads(row[0])["strategy"]
            except (TypeError, ValueError, KeyError):
                self._strategy = "WAL_LOG"
            if self._strategy not in STRATEGIES:
                self._strategy = "WAL_LOG"
        return self._strategy

    def _build(self, tree: Path, cgroup: cgroups.Leaf | None = None) -> None:
        from psycopg import sql

        srv, role, build = self.srv, self.name, self.name + "_build"
        password = secrets.token_urlsafe(24)
        with srv.session(srv.shared_db) as conn:
            conn.execute(sql_text("DROP DATABASE IF EXISTS {d} WITH (FORCE)", d=ident(build)))
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                conn.execute(sql_text("ALTER ROLE {r} LOGIN PASSWORD {p}", r=ident(role), p=sql.Literal(password)))
            else:
                conn.execute(sql_text("CREATE ROLE {r} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {p}",
                                  r=ident(role), p=sql.Literal(password)))
            # Owner = golden role: it is pg_database_owner there, so migrations may create in public.
            conn.execute(sql_text("CREATE DATABASE {d} OWNER {r}", d=ident(build), r=ident(role)))
            conn.execute(sql_text("REVOKE CONNECT, TEMPORARY ON DATABASE {d} FROM PUBLIC", d=ident(build)))
        try:
            if self.extensions:
                with contextlib.closing(srv.connect(build)) as conn:
                    create_extensions(conn, self.extensions)
            if self.migrate:
                url = srv.box_url(role, password, build, at=self.seen_at)
                db = {"host": self.seen_at[0], "port": self.seen_at[1], "user": role, "password": password,
                      "name": build, "schema": "public", "url": url}
                run_migrate(self.migrate, tree, {**os.environ, **self._env(db)}, self.logs_dir,
                            [password, *self.redact], what="golden database migration", cgroup=cgroup,
                            timeout=self.timeout, launcher=self.launcher)
            with srv.session(srv.shared_db) as conn:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (build,))
                _wait_no_sessions(conn, build)
                conn.execute(sql_text("ALTER DATABASE {d} RENAME TO {n}", d=ident(build), n=ident(self.name)))
                # Nobody connects to a template: a session on it would make CREATE DATABASE … TEMPLATE fail.
                conn.execute(sql_text("ALTER DATABASE {d} ALLOW_CONNECTIONS false", d=ident(self.name)))
                # REASSIGN OWNED in a clone also moves *shared* objects of the golden role: it must own no database.
                conn.execute(sql_text("ALTER DATABASE {d} OWNER TO {o}", d=ident(self.name), o=ident(conn.info.user)))
                conn.execute(sql_text("ALTER ROLE {r} NOLOGIN PASSWORD NULL", r=ident(role)))
                strategy, timings = self._measure(conn)
                # an extensions-only copy is every repo's: no repo's stale sweep may drop it
                comment = json.dumps({"repo": self.repo if self.migrate else None, "strategy": strategy,
                                      "clone_ms": timings})
                conn.execute(sql_text("COMMENT ON DATABASE {d} IS {c}", d=ident(self.name), c=sql.Literal(comment)))
                self._strategy = strategy
                self._drop_stale(conn)
        except BaseException:
            with contextlib.suppress(Exception), srv.session(srv.shared_db) as conn:
                conn.execute(sql_text("DROP DATABASE IF EXISTS {d} WITH (FORCE)", d=ident(build)))
                conn.execute(sql_text("DROP ROLE IF EXISTS {r}", r=ident(role)))
            raise

    def _measure(self, conn: Any, rounds: int = 2) -> tuple[str, dict[str, float]]:
        """Time CREATE DATABASE … TEMPLATE with each strategy; the faster one is used for boxes."""
        best: dict[str, float] = {}
        if conn.info.server_version < 150000:
            return "FILE_COPY", best
        probe = self.name + "_probe"
        for _ in range(rounds):
            for strategy in STRATEGIES:
                t0 = time.perf_counter()
                clone(conn, probe, self.name, conn.info.user, strategy)
                ms = (time.perf_counter() - t0) * 1000
                conn.execute(sql_text("DROP DATABASE {d} WITH (FORCE)", d=ident(probe)))
                best[strategy] = round(min(best.get(strategy, ms), ms), 2)
        return min(best, key=best.__getitem__), best

    def _drop_stale(self, conn: Any) -> None:
        """Drop this repo's golden databases for older migration states."""
        rows = conn.execute(
            "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database"
            " WHERE datname LIKE 'wt\\_golden\\_%%' AND datname <> %s", (self.name,)).fetchall()
        for name, comment in rows:
            try:
                repo = json.loads(comment or "{}").get("repo")
            except ValueError:
                repo = None
            stale_build = name.endswith(("_build", "_probe"))
            if repo != self.repo and not stale_build:
                continue
            if stale_build and name.rsplit("_", 1)[0] != self.name:
                continue  # another golden's build may be running right now
            with contextlib.suppress(Exception):
                if not stale_build:  # its spares (copies of the old state) first; a refill making one ends first
                    key = name.removeprefix(GOLDEN_PREFIX)
                    with file_lock(self.home / f"postgres.spares.{key}.lock", timeout=30, what="the spares' lock"):
                        dbspares.drop(conn, key)
                conn.execute(sql_text("DROP DATABASE IF EXISTS {d} WITH (FORCE)", d=ident(name)))
                conn.execute(sql_text("DROP ROLE IF EXISTS {r}", r=ident(name)))


def _wait_no_sessions(conn: Any, dbname: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while conn.execute("SELECT 1 FROM pg_stat_activity WHERE datname = %s", (dbname,)).fetchone():
        if time.monotonic() > deadline:
            raise WtboxError(f"Sessions on the database {dbname} did not end within {timeout:.0f}s.")
        time.sleep(0.02)


def migrations_hash(repo: str, sha: str, migrate: str | None, globs: list[str], extensions: list[str]) -> str:
    """Hash over the migration files at `sha` (by git blob id), the migrate command, extensions and repo."""
    from worktreebox.system import git

    h = hashlib.sha256()
    # Without a migrate command the golden copy holds only the extensions: one for every repo.
    for part in (str(Path(repo).resolve()) if migrate else "", migrate or "", ",".join(extensions)):
        h.update(part.encode() + b"\0")
    if migrate:
        pattern = re.compile("|".join(f"(?:{glob_to_regex(g)})" for g in globs) or "(?!)")
        for path, blob in sorted(git.files_at(repo, sha).items()):
            if pattern.fullmatch(path):
                h.update(f"{path}\0{blob}\n".encode())
    return h.hexdigest()[:16]


def glob_to_regex(glob: str) -> str:
    """`**` spans directories, `*` and `?` stay within one path segment."""
    out, i = [], 0
    while i < len(glob):
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] == "*":
            out.append("[^/]*")
            i += 1
        elif glob[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return "".join(out)


def clone(conn: Any, name: str, template: str, owner: str, strategy: str) -> None:
    # STRATEGY exists from PostgreSQL 15 on; older external servers only know the file copy.
    clause = f" STRATEGY {strategy}" if strategy in STRATEGIES and conn.info.server_version >= 150000 else ""
    conn.execute(sql_text("CREATE DATABASE {d} TEMPLATE {t} OWNER {o}" + clause,
                      d=ident(name), t=ident(template), o=ident(owner)))


# ---------------------------------------------------------------- migrate

def run_migrate(cmd: str, cwd: Path, env: dict[str, str], logs_dir: Path, redact: list[str],
                what: str = "database migration", cgroup: cgroups.Leaf | None = None,
                timeout: float = MIGRATE_TIMEOUT, launcher: Any = None) -> None:
    """Run `[database] migrate` with its output in logs/migrate.jsonl; failure (or `timeout`, [database]
    timeout) raises with the last lines."""
    from worktreebox.secrets import Redactor
    from worktreebox.telemetry.logs.run import run_logged

    red = Redactor(redact)
    code, last = run_logged(cmd, cwd, env, logs_dir, "migrate", red, timeout=timeout, keep_lines=_LAST_LINES,
                            cgroup=cgroup, launcher=launcher)
    if code == 124 and last and last[-1].startswith("wtbox: timed out"):
        raise WtboxError(f"The {what} `{red(cmd)}` did not finish within {timeout:g}s ([database] timeout); "
                         f"its last lines:\n" + "\n".join(last[:-1] or ["(no output)"]))
    if code != 0:
        tail = "\n".join(last) or "(no output)"
        raise WtboxError(f"The {what} `{red(cmd)}` failed with exit code {code}; last lines:\n{tail}")

