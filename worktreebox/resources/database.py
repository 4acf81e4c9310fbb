"""The database resource: a role and schema (or a cloned database) per box on the host's PostgreSQL.

Names derive from the box id: role, schema and database are all `wt_<8 hex>`. In
`schema` mode the box lives in the server's shared database; in `database` mode it
gets its own database cloned from a golden one (`wt_golden_<hash>`) that was migrated
once, so a new box does not re-run the migrations (providers/postgres/golden.py; what a
box owns on the server and how it is dropped: providers/postgres/boxdb.py).
"""
from __future__ import annotations

import contextlib
import re
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worktreebox.box import CREATING, FAILED
from worktreebox.config.templating import render
from worktreebox.errors import ConfigError, WtboxError
from worktreebox.providers.postgres import server
from worktreebox.providers.postgres import spares as dbspares
from worktreebox.providers.postgres.boxdb import drop, ident, owner_tag, prepare_database, sql_text
from worktreebox.providers.postgres.golden import Golden, clone, migrations_hash, run_migrate
from worktreebox.resources.base import Creation, Resource, warn
from worktreebox.services.boxenv import process_env
from worktreebox.system import cgroups

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.config.load import RepoConfig
    from worktreebox.context import HostContext
    from worktreebox.providers.postgres.base import Server

BOX_NAME = re.compile(r"^wt_[0-9a-f]{8}$")


class Database(Resource):
    name = "database"
    phase = "database"
    parallel = True

    def warm(self, host: HostContext, data: dict[str, Any] | None, config: RepoConfig | None, *,
             pooled: bool = False) -> None:
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
        if c.origin is not None and (cfg.mode != "database" or not c.origin.database):
            raise WtboxError(f"A fork copies its origin's database, which needs [database] mode = \"database\" "
                             f"in both; {c.config.source} says {cfg.mode!r}.")
        _Driver.ready()
        srv = server(c.host, cfg.provider)
        role = c.box.pg_name
        password = secrets.token_urlsafe(24)
        dbname = role if cfg.mode == "database" else srv.shared_db
        schema = role if cfg.mode == "schema" else "public"
        # Recorded first, so a rollback after a partial create knows what to drop.
        c.box.data[self.name] = {"mode": cfg.mode, "provider": srv.provider, "name": dbname, "schema": schema,
                                 "user": role, "password": password, "url": None,
                                 # what its data was migrated from (the box's fingerprint names it)
                                 "migrations": migrations_hash(str(c.box.repo), c.base_sha, cfg.migrate,
                                                               cfg.migrations, cfg.extensions)}
        c.note(f"database ({cfg.mode} mode, {srv.provider})")
        try:
            if cfg.mode == "schema":
                self._create_schema(srv, c.host.home, role, password, cfg.extensions)
            elif c.origin is not None:
                self._create_role(srv, c.host.home, role, password)
                self._copy_origin(c, srv, role)
            else:
                golden = golden_for(c, srv)
                self._create_role(srv, c.host.home, role, password)
                if golden.needed and not golden.ready():
                    # The golden copy is migrated in this box's own tree once its dependency layers and
                    # [setup] have run (Migrations.start); the box's database is cloned then.
                    c.box.data[self.name]["pending"] = golden.hash
                else:
                    self._create_database(c, srv, role, golden)
        except BaseException:
            with contextlib.suppress(Exception):
                drop(srv, role)
            raise
        c.box.data[self.name]["url"] = srv.box_url(role, password, dbname)  # the host's way in (status, db)
        host, port = seen_at(c, srv)
        url = srv.box_url(role, password, dbname, at=(host, port))
        c.env.update({
            "DATABASE_URL": url, "PGHOST": host, "PGPORT": str(port), "PGUSER": role,
            "PGPASSWORD": password, "PGDATABASE": dbname,
        })
        c.facts["db"] = {"host": host, "port": port, "user": role, "password": password,
                         "name": dbname, "schema": schema, "url": url}

    def _create_schema(self, srv: Server, home: Path, role: str, password: str, extensions: list[str]) -> None:
        from psycopg import sql

        prepare_database(srv, srv.shared_db, extensions)
        with srv.session(srv.shared_db) as conn, conn.transaction():
            conn.execute(sql_text("CREATE ROLE {r} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {p}",
                              r=ident(role), p=sql.Literal(password)))
            conn.execute(sql_text("COMMENT ON ROLE {r} IS {t}", r=ident(role), t=sql.Literal(owner_tag(home))))
            conn.execute(sql_text("CREATE SCHEMA {r} AUTHORIZATION {r}", r=ident(role)))
            conn.execute(sql_text("ALTER ROLE {r} SET search_path = {r}, public", r=ident(role)))

    def _create_role(self, srv: Server, home: Path, role: str, password: str) -> None:
        from psycopg import sql

        # One transaction: a role without its owner tag is one no gc would ever call ours.
        with srv.session(srv.shared_db) as conn, conn.transaction():
            # CREATEDB: test runners (Django's, pytest-django, Rails') create and drop their own test
            # databases. Those are owned by the box's role, so `rm` drops them with it.
            conn.execute(sql_text("CREATE ROLE {r} LOGIN NOSUPERUSER CREATEDB NOCREATEROLE PASSWORD {p}",
                              r=ident(role), p=sql.Literal(password)))
            conn.execute(sql_text("COMMENT ON ROLE {r} IS {t}", r=ident(role), t=sql.Literal(owner_tag(home))))

    def _create_database(self, c: Creation, srv: Server, role: str, golden: Golden) -> None:
        """The box's own database: a spare made ahead (a rename), else a clone of the golden copy, else
        (nothing to migrate) a new one; then spares are made again in the background for the next box."""
        key = golden.hash if golden.needed else dbspares.EMPTY
        template = golden.name if golden.needed else "template1"
        want = c.host.config.database_spares
        with srv.session(srv.shared_db) as conn:
            took = want > 0 and dbspares.claim(conn, key, role)
            if took:
                conn.execute(sql_text("ALTER DATABASE {d} OWNER TO {r}", d=ident(role), r=ident(role)))
            elif golden.needed:
                clone(conn, role, golden.name, role, golden.strategy(conn))
            else:
                conn.execute(sql_text("CREATE DATABASE {d} OWNER {r}", d=ident(role), r=ident(role)))
            # no other role may open a session on it (boxes included)
            conn.execute(sql_text("REVOKE CONNECT, TEMPORARY ON DATABASE {d} FROM PUBLIC", d=ident(role)))
            short = want > 0 and dbspares.count(conn, key) < want
            strategy = golden.strategy(conn) if golden.needed else None
        c.box.data[self.name]["spare"] = bool(took)
        c.box.data[self.name]["golden"] = {"key": key, "template": template}  # what `db reset` goes back to
        if golden.needed:
            # Migrated objects belong to the golden role; hand them to the box (REASSIGN is per database).
            with contextlib.closing(srv.connect(role)) as conn:
                conn.execute(sql_text("REASSIGN OWNED BY {g} TO {r}", g=ident(golden.name), r=ident(role)))
        if short:
            dbspares.refill_later(c.host.home, srv.provider, key, template, strategy, want)

    def _copy_origin(self, c: Creation, srv: Server, role: str) -> None:
        """A fork's database: a copy of its origin's snapshot, its objects handed to this box's role."""
        from worktreebox.providers.postgres import boxcopy

        origin = c.origin
        assert origin is not None and origin.database
        with srv.session(srv.shared_db) as conn:
            if origin.take_database:  # a rename: the snapshot is this fork's alone
                conn.execute(sql_text("ALTER DATABASE {s} RENAME TO {d}", s=ident(origin.database), d=ident(role)))
            else:
                boxcopy.copy_database(conn, origin.database, role, end_source_sessions=False,
                                      strategy=boxcopy.strategy_for(conn, origin.database, origin.strategy))
        boxcopy.hand_to_box(srv, role, role, reassign_from=origin.database_role, shared_owner=origin.database_role)

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
                            cgroup=cgroups.Leaf(c.host.home, c.box.id, cgroups.MIGRATE), timeout=cfg.timeout,
                            launcher=sandbox_launcher(c.box))
            c.timings["migrate"] = round(time.monotonic() - t0, 4)
            return
        if not data.get("pending"):
            return
        srv = server(c.host, cfg.provider)
        golden = golden_for(c, srv)
        c.note("database: migrating the golden copy (once per migration set)")
        golden.launcher = sandbox_launcher(c.box)  # in this box's sandbox, made by now
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
                drop(srv, box.pg_name)
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
        drop(srv, pg_name)

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


# ---------------------------------------------------------------- helpers

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


def _server_for(host: HostContext, provider: str | None) -> Server | None:
    """The server a box's database was made on (as recorded), or None if it cannot hold anything."""
    srv = server(host, provider)
    if srv.provider == "embedded" and not srv.initialised:  # type: ignore[attr-defined]
        return None
    return srv


def seen_at(c: Creation, srv: Server) -> tuple[str, int]:
    """Where the box's processes reach the server: 127.0.0.1:5432 in a sandboxed box (its supervisor's
    forward, where `wtbox net` puts faults), else the server's own address."""
    from worktreebox.config.values import INSIDE_PORTS
    from worktreebox.resources import sandbox

    if sandbox.sandboxed(c.box):
        return "127.0.0.1", INSIDE_PORTS["database"]
    return srv.box_host, srv.box_port


def golden_for(c: Creation, srv: Server) -> Golden:
    """The golden copy a box of this creation is cloned from: its migrations run with the box's env,
    every database variable (its own, [database] env, [box] env) naming the golden copy."""
    cfg = c.config.database

    def env(db: dict[str, Any]) -> dict[str, str]:
        out = {**(c.box.env or c.env), **_db_env(db)}
        facts = {**c.facts, "db": db}
        out.update(_render_env(cfg.env, facts, c.config.source))
        out.update(_render_env(c.config.box.env, facts, c.config.source, "box"))
        return {**out, **c.secrets}

    return Golden(srv, Path(c.host.home), str(c.box.repo), c.base_sha, cfg.migrate, cfg.migrations,
                  cfg.extensions, env, c.box.logs_dir, list(c.secrets.values()), timeout=cfg.timeout,
                  seen_at=seen_at(c, srv))


def sandbox_launcher(box: Box) -> Any:
    from worktreebox.resources import sandbox

    return sandbox.launcher(box)


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
