"""The database resource: a role and schema (or a cloned database) per box on the host's PostgreSQL.

Names derive from the box id: role, schema and database are all `wt_<8 hex>`. In
`schema` mode the box lives in the server's shared database; in `database` mode it
gets its own database cloned from a golden one (`wt_golden_<hash>`) that was migrated
once, so a new box does not re-run the migrations.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worktreebox.box import CREATING, FAILED
from worktreebox.config.templating import render
from worktreebox.errors import ConfigError, WtboxError
from worktreebox.providers.postgres import server
from worktreebox.providers.postgres import spares as dbspares
from worktreebox.resources.base import Creation, Resource, warn
from worktreebox.services.boxenv import process_env
from worktreebox.system import cgroups
from worktreebox.system.fsutil import file_lock

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.config.load import RepoConfig
    from worktreebox.context import HostContext
    from worktreebox.providers.postgres.base import Server

BOX_NAME = re.compile(r"^wt_[0-9a-f]{8}$")
GOLDEN_PREFIX = "wt_golden_"
STRATEGIES = ("WAL_LOG", "FILE_COPY")
MIGRATE_TIMEOUT = 1800.0
_LAST_LINES = 10

# Per process: (server key, database) pairs whose public schema and extensions were checked.
_PREPARED: set[tuple[str, str, tuple[str, ...]]] = set()


def _ident(name: str):
    from psycopg import sql

    return sql.Identifier(name)


def _sql(text: str, **parts: Any):
    from psycopg import sql

    return sql.SQL(text).format(**parts)


class Database(Resource):
    name = "database"
    phase = "database"
    parallel = True

    def warm(self, data: dict[str, Any] | None, config: RepoConfig | None) -> None:
        # `import psycopg` is ~120 ms of CPU, the largest single cost of a `new` or `rm` in database
        # mode; begun now, it overlaps resolving the repo, the config and the ports.
        wanted = config.database.mode != "none" if config is not None else bool((data or {}).get(self.name))
        if wanted:
            _Driver.load_in_background()

    # ------------------------------------------------------------ create
    def create(self, c: Creation) -> None:
        cfg = c.config.database
        if cfg.mode == "none":
            return
        _Driver.ready()
        srv = server(c.host, cfg.provider)
        role = c.box.pg_name
        password = secrets.token_urlsafe(24)
        dbname = role if cfg.mode == "database" else srv.shared_db
        schema = role if cfg.mode == "schema" else "public"
        # Recorded first, so a rollback after a partial create knows what to drop.
        c.box.data[self.name] = {"mode": cfg.mode, "provider": srv.provider, "name": dbname, "schema": schema,
                                 "user": role, "password": password, "url": None}
        c.note(f"database ({cfg.mode} mode, {srv.provider})")
        try:
            if cfg.mode == "schema":
                self._create_schema(srv, c.host.home, role, password, cfg.extensions)
            else:
                golden = Golden.for_creation(c, srv)
                self._create_role(srv, c.host.home, role, password)
                if golden.needed and not golden.ready():
                    # The golden copy is migrated in this box's own tree once its dependency layers and
                    # [setup] have run (Migrations.start); the box's database is cloned then.
                    c.box.data[self.name]["pending"] = golden.hash
                else:
                    self._create_database(c, srv, role, golden)
        except BaseException:
            with contextlib.suppress(Exception):
                _drop(srv, role)
            raise
        url = srv.box_url(role, password, dbname)
        c.box.data[self.name]["url"] = url
        c.env.update({
            "DATABASE_URL": url, "PGHOST": srv.box_host, "PGPORT": str(srv.box_port), "PGUSER": role,
            "PGPASSWORD": password, "PGDATABASE": dbname,
        })
        c.facts["db"] = {"host": srv.box_host, "port": srv.box_port, "user": role, "password": password,
                         "name": dbname, "schema": schema, "url": url}

    def _create_schema(self, srv: Server, home: Path, role: str, password: str, extensions: list[str]) -> None:
        from psycopg import sql

        prepare_database(srv, srv.shared_db, extensions)
        with srv.session(srv.shared_db) as conn, conn.transaction():
            conn.execute(_sql("CREATE ROLE {r} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {p}",
                              r=_ident(role), p=sql.Literal(password)))
            conn.execute(_sql("COMMENT ON ROLE {r} IS {t}", r=_ident(role), t=sql.Literal(owner_tag(home))))
            conn.execute(_sql("CREATE SCHEMA {r} AUTHORIZATION {r}", r=_ident(role)))
            conn.execute(_sql("ALTER ROLE {r} SET search_path = {r}, public", r=_ident(role)))

    def _create_role(self, srv: Server, home: Path, role: str, password: str) -> None:
        from psycopg import sql

        # One transaction: a role without its owner tag is one no gc would ever call ours.
        with srv.session(srv.shared_db) as conn, conn.transaction():
            # CREATEDB: test runners (Django's, pytest-django, Rails') create and drop their own test
            # databases. Those are owned by the box's role, so `rm` drops them with it.
            conn.execute(_sql("CREATE ROLE {r} LOGIN NOSUPERUSER CREATEDB NOCREATEROLE PASSWORD {p}",
                              r=_ident(role), p=sql.Literal(password)))
            conn.execute(_sql("COMMENT ON ROLE {r} IS {t}", r=_ident(role), t=sql.Literal(owner_tag(home))))

    def _create_database(self, c: Creation, srv: Server, role: str, golden: Golden) -> None:
        """The box's own database: a spare made ahead (a rename), else a clone of the golden copy, else
        (nothing to migrate) a new one; then spares are made again in the background for the next box."""
        key = golden.hash if golden.needed else dbspares.EMPTY
        template = golden.name if golden.needed else "template1"
        want = c.host.config.database_spares
        with srv.session(srv.shared_db) as conn:
            took = want > 0 and dbspares.claim(conn, key, role)
            if took:
                conn.execute(_sql("ALTER DATABASE {d} OWNER TO {r}", d=_ident(role), r=_ident(role)))
            elif golden.needed:
                clone(conn, role, golden.name, role, golden.strategy(conn))
            else:
                conn.execute(_sql("CREATE DATABASE {d} OWNER {r}", d=_ident(role), r=_ident(role)))
            # no other role may open a session on it (boxes included)
            conn.execute(_sql("REVOKE CONNECT, TEMPORARY ON DATABASE {d} FROM PUBLIC", d=_ident(role)))
            short = want > 0 and dbspares.count(conn, key) < want
            strategy = golden.strategy(conn) if golden.needed else None
        c.box.data[self.name]["spare"] = bool(took)
        if golden.needed:
            # Migrated objects belong to the golden role; hand them to the box (REASSIGN is per database).
            with contextlib.closing(srv.connect(role)) as conn:
                conn.execute(_sql("REASSIGN OWNED BY {g} TO {r}", g=_ident(golden.name), r=_ident(role)))
        if short:
            dbspares.refill_later(c.host.home, srv.provider, key, template, strategy, want)

    def migrate(self, c: Creation) -> None:
        """The box's migrations, in its own tree after its dependency layers and [setup] (Migrations.start):
        schema mode runs `[database] migrate` in the box; database mode builds the golden copy once per
        migration hash (in this box's tree, if it is the first) and clones it."""
        cfg = c.config.database
        data = c.box.data.get(self.name)
        if not data or cfg.mode == "none":
            return
        c.timings.setdefault("migrate", 0.0)  # a clone of a golden copy migrates nothing
        t0 = time.monotonic()
        if cfg.mode == "schema":
            if cfg.migrate:
                c.note("database: migrate")
                # What every process of the box runs with (boxenv): the box env, plus --secret values.
                env = process_env(c.box, c.secrets)
                run_migrate(cfg.migrate, c.box.path, env, c.box.logs_dir, [data["password"], *c.secrets.values()],
                            cgroup=cgroups.Leaf(c.host.home, c.box.id, cgroups.MIGRATE))
            c.timings["migrate"] = round(time.monotonic() - t0, 4)
            return
        if not data.get("pending"):
            return
        srv = server(c.host, cfg.provider)
        golden = Golden.for_creation(c, srv)
        c.note("database: migrating the golden copy (once per migration set)")
        golden.ensure(c.box.path, cgroup=cgroups.Leaf(c.host.home, c.box.id, cgroups.MIGRATE))
        c.timings["migrate"] = round(time.monotonic() - t0, 4)
        t0 = time.monotonic()
        self._create_database(c, srv, data["user"], golden)
        data.pop("pending", None)
        c.timings["database"] = round(c.timings.get("database", 0.0) + time.monotonic() - t0, 4)

    # ------------------------------------------------------------ destroy
    def destroy(self, host: HostContext, box: Box) -> None:
        _Driver.ready()
        data = box.data.get(self.name)
        if data and data.get("mode") != "none":
            srv = _server_for(host, data.get("provider"))
            if srv is not None:
                _drop(srv, box.pg_name)
            return
        if box.data and box.state not in (CREATING, FAILED):
            return  # a box made without a database (mode none): don't even connect
        # No record: gc of an orphan whose row is gone (its id may be the `wt_<hex>` discover reported),
        # or of a `creating` row whose command died between CREATE ROLE and saving the row. Drop only
        # what discover would call ours, and never start a cluster for it.
        name = box.id if BOX_NAME.match(box.id) else box.pg_name
        self.destroy_by_name(host, name, only_ours=True)

    def destroy_by_name(self, host: HostContext, pg_name: str, *, only_ours: bool = False) -> None:
        """Drop an orphan's role, schema and databases given only its `wt_<hex>` name (for gc)."""
        if not BOX_NAME.match(pg_name):
            raise WtboxError(f"{pg_name!r} is not a box database name (wt_ followed by 8 hex digits).")
        srv = server(host)
        if srv.provider != "external" and not srv.is_running():
            return
        if only_ours:
            with srv.session(srv.shared_db) as conn:
                row = conn.execute("SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = %s",
                                   (pg_name,)).fetchone()
            if row is not None and row[0] != owner_tag(host.home):
                return  # another host's box on a shared server
            if row is None and srv.provider not in ("embedded", "docker"):
                return  # a schema or database without its role: on a shared server we can't tell whose
        _drop(srv, pg_name)

    # ------------------------------------------------------------ discover / status
    def discover(self, host: HostContext) -> set[str]:
        """Ids of boxes with a role, schema or database; `wt_<hex>` for ones the registry doesn't know.

        Never starts the embedded cluster: a cluster that is not running holds no live orphans to report.
        """
        from worktreebox.box import hex_of

        srv = server(host)
        if srv.provider != "external" and not srv.is_running():
            return set()
        try:
            with srv.session(srv.shared_db) as conn:
                # A server may be shared by several hosts: only roles tagged with this host's home are ours.
                names = {r[0] for r in conn.execute(
                    "SELECT rolname FROM pg_roles WHERE rolname ~ '^wt_[0-9a-f]{8}$'"
                    " AND shobj_description(oid, 'pg_authid') = %s", (owner_tag(host.home),))}
                if srv.provider == "embedded":  # ours alone: schemas and databases whose role is gone, too
                    names |= {r[0] for r in conn.execute(
                        "SELECT nspname FROM pg_namespace WHERE nspname ~ '^wt_[0-9a-f]{8}$'"
                        " UNION SELECT datname FROM pg_database WHERE datname ~ '^wt_[0-9a-f]{8}$'"
                        " EXCEPT SELECT rolname FROM pg_roles")}
        except WtboxError:
            return set()
        by_hex = {hex_of(i): i for i in host.registry.select_box_ids()}
        return {by_hex.get(n[3:], n) for n in names}

    def status(self, host: HostContext, box: Box) -> dict[str, Any] | None:
        data = box.data.get(self.name)
        if not data:
            return None
        from worktreebox.secrets import mask_url

        return {"mode": data.get("mode"), "provider": data.get("provider"), "name": data.get("name"),
                "schema": data.get("schema"), "user": data.get("user"), "url": mask_url(data.get("url") or "")}


# ---------------------------------------------------------------- server-side helpers

class _Driver:
    """psycopg imported on a daemon thread, once per process. Whoever needs it calls ready()
    first: two threads importing psycopg's modules at once can see one half-initialised."""

    _thread: threading.Thread | None = None

    @classmethod
    def load_in_background(cls) -> None:
        if cls._thread is None and "psycopg" not in sys.modules:  # a CLI server (cliserver.py) preloads it
            cls._thread = threading.Thread(target=cls._load, name="load-psycopg", daemon=True)
            cls._thread.start()

    @staticmethod
    def _load() -> None:
        with contextlib.suppress(Exception):  # a broken install raises again, clearly, where it is used
            import psycopg  # noqa: F401

    @classmethod
    def ready(cls) -> None:
        if cls._thread is not None:
            cls._thread.join()


def owner_tag(home: Path | str) -> str:
    """COMMENT on a box role naming the wtbox host that made it (servers may be shared by hosts)."""
    import socket

    return json.dumps({"wtbox_home": str(home), "hostname": socket.gethostname()}, sort_keys=True)


def _server_for(host: HostContext, provider: str | None) -> Server | None:
    """The server a box's database was made on (as recorded), or None if it cannot hold anything."""
    srv = server(host, provider)
    if srv.provider == "embedded" and not srv.initialised:  # type: ignore[attr-defined]
        return None
    return srv


def prepare_database(srv: Server, dbname: str, extensions: list[str]) -> None:
    """Once per database: nobody but the owner creates in public; listed extensions exist in public."""
    key = (srv.key(), dbname, tuple(sorted(extensions)))
    if key in _PREPARED:
        return
    with srv.session(dbname) as conn:
        public_can_create = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace n,"
            " aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) a"
            " WHERE n.nspname = 'public' AND a.grantee = 0 AND a.privilege_type = 'CREATE')").fetchone()[0]
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
                conn.execute(_sql("CREATE EXTENSION IF NOT EXISTS {e} SCHEMA public", e=_ident(ext)))
        except psycopg.Error as e:
            raise WtboxError(f"[database] extensions: cannot create the extension {ext!r}: "
                             f"{str(e).strip().splitlines()[0]}.") from None


def clone(conn: Any, name: str, template: str, owner: str, strategy: str) -> None:
    # STRATEGY exists from PostgreSQL 15 on; older external servers only know the file copy.
    clause = f" STRATEGY {strategy}" if strategy in STRATEGIES and conn.info.server_version >= 150000 else ""
    conn.execute(_sql("CREATE DATABASE {d} TEMPLATE {t} OWNER {o}" + clause,
                      d=_ident(name), t=_ident(template), o=_ident(owner)))


def _drop(srv: Server, role: str) -> None:
    """Terminate the role's sessions, drop its databases, schema and the role; fine if gone."""
    import psycopg

    with srv.session(srv.shared_db) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                     " WHERE usename = %s AND pid <> pg_backend_pid()", (role,))
        dbs = [r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE datname = %s"
            " OR datdba = (SELECT oid FROM pg_roles WHERE rolname = %s)", (role, role))]
        for db in dbs:
            conn.execute(_sql("DROP DATABASE IF EXISTS {d} WITH (FORCE)", d=_ident(db)))
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        with conn.transaction():
            conn.execute(_sql("DROP SCHEMA IF EXISTS {s} CASCADE", s=_ident(role)))
            if exists:
                conn.execute(_sql("DROP OWNED BY {r}", r=_ident(role)))
        if not exists:
            return
        try:
            conn.execute(_sql("DROP ROLE IF EXISTS {r}", r=_ident(role)))
            return
        except psycopg.errors.DependentObjectsStillExist:
            # Objects in other databases (e.g. a table the box made in `postgres`): drop them there.
            others = [r[0] for r in conn.execute(
                "SELECT DISTINCT d.datname FROM pg_shdepend s JOIN pg_database d ON d.oid = s.dbid"
                " WHERE s.refobjid = (SELECT oid FROM pg_roles WHERE rolname = %s)", (role,))]
    for db in others:
        with contextlib.closing(srv.connect(db)) as other:
            other.execute(_sql("DROP OWNED BY {r}", r=_ident(role)))
    with srv.session(srv.shared_db) as conn:
        conn.execute(_sql("DROP ROLE IF EXISTS {r}", r=_ident(role)))


# ---------------------------------------------------------------- golden databases (database mode)

class Golden:
    """The migrated database that boxes of one repo and one migration state are cloned from."""

    def __init__(self, srv: Server, home: Path, repo: str, base_sha: str, migrate: str | None,
                 globs: list[str], extensions: list[str], env: Callable[[dict[str, Any]], dict[str, str]],
                 logs_dir: Path, redact: list[str]) -> None:
        self.srv, self.home, self.repo, self.base_sha = srv, home, repo, base_sha
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

    @classmethod
    def for_creation(cls, c: Creation, srv: Server) -> Golden:
        cfg = c.config.database

        def env(db: dict[str, Any]) -> dict[str, str]:
            # the box's env with every database variable (its own, [database] env, [box] env) naming the golden copy
            out = {**(c.box.env or c.env), **_db_env(db)}
            facts = {**c.facts, "db": db}
            out.update(_render_env(cfg.env, facts, c.config.source))
            out.update(_render_env(c.config.box.env, facts, c.config.source, "box"))
            return {**out, **c.secrets}

        return cls(srv, Path(c.host.home), str(c.box.repo), c.base_sha, cfg.migrate, cfg.migrations,
                   cfg.extensions, env, c.box.logs_dir, list(c.secrets.values()))

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
            conn.execute(_sql("DROP DATABASE IF EXISTS {d} WITH (FORCE)", d=_ident(build)))
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                conn.execute(_sql("ALTER ROLE {r} LOGIN PASSWORD {p}", r=_ident(role), p=sql.Literal(password)))
            else:
                conn.execute(_sql("CREATE ROLE {r} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {p}",
                                  r=_ident(role), p=sql.Literal(password)))
            # Owner = golden role: it is pg_database_owner there, so migrations may create in public.
            conn.execute(_sql("CREATE DATABASE {d} OWNER {r}", d=_ident(build), r=_ident(role)))
            conn.execute(_sql("REVOKE CONNECT, TEMPORARY ON DATABASE {d} FROM PUBLIC", d=_ident(build)))
        try:
            if self.extensions:
                with contextlib.closing(srv.connect(build)) as conn:
                    create_extensions(conn, self.extensions)
            if self.migrate:
                url = srv.box_url(role, password, build)
                db = {"host": srv.box_host, "port": srv.box_port, "user": role, "password": password,
                      "name": build, "schema": "public", "url": url}
                run_migrate(self.migrate, tree, {**os.environ, **self._env(db)}, self.logs_dir,
                            [password, *self.redact], what="golden database migration", cgroup=cgroup)
            with srv.session(srv.shared_db) as conn:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (build,))
                _wait_no_sessions(conn, build)
                conn.execute(_sql("ALTER DATABASE {d} RENAME TO {n}", d=_ident(build), n=_ident(self.name)))
                # Nobody connects to a template: a session on it would make CREATE DATABASE … TEMPLATE fail.
                conn.execute(_sql("ALTER DATABASE {d} ALLOW_CONNECTIONS false", d=_ident(self.name)))
                # REASSIGN OWNED in a clone also moves *shared* objects of the golden role: it must own no database.
                conn.execute(_sql("ALTER DATABASE {d} OWNER TO {o}", d=_ident(self.name), o=_ident(conn.info.user)))
                conn.execute(_sql("ALTER ROLE {r} NOLOGIN PASSWORD NULL", r=_ident(role)))
                strategy, timings = self._measure(conn)
                # an extensions-only copy is every repo's: no repo's stale sweep may drop it
                comment = json.dumps({"repo": self.repo if self.migrate else None, "strategy": strategy,
                                      "clone_ms": timings})
                conn.execute(_sql("COMMENT ON DATABASE {d} IS {c}", d=_ident(self.name), c=sql.Literal(comment)))
                self._strategy = strategy
                self._drop_stale(conn)
        except BaseException:
            with contextlib.suppress(Exception), srv.session(srv.shared_db) as conn:
                conn.execute(_sql("DROP DATABASE IF EXISTS {d} WITH (FORCE)", d=_ident(build)))
                conn.execute(_sql("DROP ROLE IF EXISTS {r}", r=_ident(role)))
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
                conn.execute(_sql("DROP DATABASE {d} WITH (FORCE)", d=_ident(probe)))
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
            stale_build = name.endswith("_build") or name.endswith("_probe")
            if repo != self.repo and not stale_build:
                continue
            if stale_build and name.rsplit("_", 1)[0] != self.name:
                continue  # another golden's build may be running right now
            with contextlib.suppress(Exception):
                if not stale_build:  # its spares (copies of the old state) first; a refill making one ends first
                    key = name.removeprefix(GOLDEN_PREFIX)
                    with file_lock(self.home / f"postgres.spares.{key}.lock", timeout=30, what="the spares' lock"):
                        dbspares.drop(conn, key)
                conn.execute(_sql("DROP DATABASE IF EXISTS {d} WITH (FORCE)", d=_ident(name)))
                conn.execute(_sql("DROP ROLE IF EXISTS {r}", r=_ident(name)))


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


# ---------------------------------------------------------------- migrate

def run_migrate(cmd: str, cwd: Path, env: dict[str, str], logs_dir: Path, redact: list[str],
                what: str = "database migration", cgroup: cgroups.Leaf | None = None) -> None:
    """Run `[database] migrate` with its output in logs/migrate.jsonl; failure raises with the last lines."""
    from worktreebox.secrets import Redactor
    from worktreebox.telemetry.logs.run import run_logged

    red = Redactor(redact)
    code, last = run_logged(cmd, cwd, env, logs_dir, "migrate", red, timeout=MIGRATE_TIMEOUT, keep_lines=_LAST_LINES,
                            cgroup=cgroup)
    if code != 0:
        tail = "\n".join(last) or "(no output)"
        raise WtboxError(f"The {what} `{red(cmd)}` failed with exit code {code}; last lines:\n{tail}")


def _db_env(db: dict[str, Any]) -> dict[str, str]:
    return {"DATABASE_URL": db["url"], "PGHOST": db["host"], "PGPORT": str(db["port"]), "PGUSER": db["user"],
            "PGPASSWORD": db["password"], "PGDATABASE": db["name"]}


def _render_env(templates: dict[str, str], facts: dict[str, Any], source: str, section: str = "database"
                ) -> dict[str, str]:
    """[database] (or [box]) env for the golden build (the box's own is rendered by Host.new).

    A key that does not render here is left out of the migration's env and reported: it may
    use a fact another resource sets in parallel (`metrics`), which the box env has later.
    """
    out = {}
    for key, tmpl in templates.items():
        try:
            out[key] = render(tmpl, facts, f"{source}: [{section}] env.{key}")
        except ConfigError as e:
            warn(f"{e} The golden database migration runs without {key}.")
    return out
