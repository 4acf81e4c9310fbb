"""Putting a box back: `restore` (its own changes from a snapshot) and `db reset` (its database from
the golden copy).

Both copy the new database under a temporary name while the box runs on, then swap it in with the
box frozen for a few ms (providers/postgres/boxcopy.swap_in): the services' sessions are cut and
they reconnect to the restored data. Files are put back only when they differ from the snapshot's;
then the services are stopped first (a process with a file open in the old view would keep it) and
started again, ready, afterwards. Without a file change the services keep running, which is what
makes a data-only restore answer again in about the time of the copy.

A restore marks the box `restoring` before it changes anything and `ready` when done: killed in
between, it is never reported ready; running it again finishes it (every step is idempotent), and gc
drops the temporary database (snapshots.sweep).
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from worktreebox.box import READY, RESTORING, Box
from worktreebox.errors import WtboxError
from worktreebox.fleet import snapshots
from worktreebox.resources import own_changes
from worktreebox.system import procs

if TYPE_CHECKING:
    from worktreebox.host import Host


def restore(host: Host, box: Box, name: str) -> dict[str, Any]:
    """The box back to snapshot NAME: files, index, branch, data; the services it ran, ready."""
    from worktreebox.providers.postgres import boxcopy

    if box.state != RESTORING:
        snapshots.check_box(box)
    t0 = time.perf_counter()
    with snapshots.box_lock(box):
        snap = snapshots.get(box, name)
        db = box.data.get("database") or {}
        incoming = boxcopy.copy_name(box.pg_name, boxcopy.INCOMING) if snap.database else None
        srv = snapshots.server_of(host, box) if incoming else None
        with snapshots.operation(box, [incoming] if incoming else []):
            if srv and incoming and snap.database:
                with srv.session(srv.shared_db) as conn:  # while the box runs on: nobody uses the snapshot
                    strategy = boxcopy.strategy_for(conn, snap.database, snap.meta["database"].get("strategy"))
                    boxcopy.copy_database(conn, snap.database, incoming, strategy=strategy, end_source_sessions=False)
                boxcopy.hand_to_box(srv, incoming, db["user"])
            copy_ms = (time.perf_counter() - t0) * 1000
            snapshots.phase("restore:copied")
            files_same = own_changes.same(box, snap.dir, snap.meta["tip"])
            _mark(host, box, name)
            snapshots.phase("restore:marked")
            if not files_same:
                _services(host, box, "down")
                own_changes.put_back(host, box, snap.dir, snap.meta["tip"])
                snapshots.phase("restore:files")
            swapped_ms, outgoing = 0.0, None
            with snapshots.frozen(host, box) as pause:
                if srv and incoming:
                    swapped_ms, outgoing = boxcopy.swap_in(srv, db["name"], incoming)
            if srv and outgoing:
                boxcopy.drop_later(host.home, srv.provider, [outgoing])
            snapshots.phase("restore:swapped")
            services = _bring_services(host, box, snap.meta.get("services") or [], restart=not files_same)
            _done(host, box)
            snapshots.phase("restore:done")
    return {"id": box.id, "snapshot": name, "files_restored": not files_same, "services_restarted": not files_same,
            "services": services, "copy_ms": round(copy_ms, 1), "paused_ms": pause.ms,
            "swap_ms": round(swapped_ms, 1), "seconds": round(time.perf_counter() - t0, 3)}


def _mark(host: Host, box: Box, name: str) -> None:
    box.state = RESTORING
    box.data["restoring"] = {"snapshot": name, "by": procs.identity(os.getpid())}
    host.registry.save_box(box)


def _done(host: Host, box: Box) -> None:
    box.state = READY
    box.data.pop("restoring", None)
    box.data.pop("degraded", None)
    host.registry.save_box(box)


def _services(host: Host, box: Box, action: str, service: str | None = None) -> None:
    from worktreebox.resources import services as svc

    if action == "down":
        svc.services_down(host, box, service)
    else:
        svc.services_up(host, box, service, host.running_secrets(box))


def _bring_services(host: Host, box: Box, wanted: list[str], *, restart: bool) -> dict[str, Any]:
    """The services the snapshot ran, running and ready (started again after a file change); others down."""
    from worktreebox.services.client import services_status

    running = set(snapshots.running_services(box))
    if restart or not set(wanted) <= running:
        for name in wanted:
            if name not in running or restart:
                _services(host, box, "up", name)
    for name in sorted(set(snapshots.running_services(box)) - set(wanted)):
        _services(host, box, "down", name)
    return services_status(box)


# ---------------------------------------------------------------- db reset

def db_reset(host: Host, box: Box) -> dict[str, Any]:
    """The box's database back to the migrated golden copy (database mode: a spare made ahead, swapped
    in; schema mode: the schema dropped, made again and migrated in the box)."""
    db = box.data.get("database") or {}
    if not db or db.get("mode") == "none":
        raise WtboxError(f"{box.id} has no database ([database] mode = \"none\").")
    t0 = time.perf_counter()
    with snapshots.box_lock(box):
        out = _reset_schema(host, box, db) if db["mode"] == "schema" else _reset_database(host, box, db)
    return {"id": box.id, "mode": db["mode"], **out, "seconds": round(time.perf_counter() - t0, 3)}


def _reset_database(host: Host, box: Box, db: dict[str, Any]) -> dict[str, Any]:
    from worktreebox.providers.postgres import boxcopy
    from worktreebox.providers.postgres import spares as dbspares

    srv = snapshots.server_of(host, box)
    key, template = _golden_of(host, box, srv)
    incoming = boxcopy.copy_name(box.pg_name, boxcopy.INCOMING)
    want = host.config.database_spares
    strategy = snapshots.clone_strategy(srv, box)
    with snapshots.operation(box, [incoming]):
        with srv.session(srv.shared_db) as conn:
            took = want > 0 and dbspares.claim(conn, key, incoming)
            if not took:
                boxcopy.copy_database(conn, template, incoming, strategy=strategy, end_source_sessions=False)
            short = want > 0 and dbspares.count(conn, key) < want
        golden_role = template if key != dbspares.EMPTY else None
        boxcopy.hand_to_box(srv, incoming, db["user"], reassign_from=golden_role)
        with snapshots.frozen(host, box) as pause:
            _, outgoing = boxcopy.swap_in(srv, db["name"], incoming)
        boxcopy.drop_later(host.home, srv.provider, [outgoing])
    if short:
        dbspares.refill_later(host.home, srv.provider, key, template, strategy, want)
    return {"from": template, "spare": bool(took), "paused_ms": pause.ms}


def _golden_of(host: Host, box: Box, srv: Any) -> tuple[str, str]:
    """(spares key, template) of the box's golden copy: as recorded when it was made, else computed."""
    from worktreebox.providers.postgres import spares as dbspares
    from worktreebox.resources.base import Creation
    from worktreebox.resources.database import golden_for

    recorded = (box.data.get("database") or {}).get("golden")
    if recorded:
        return recorded["key"], recorded["template"]
    c = Creation(host=host, box=box, config=host.repo_config(box), base_sha=box.data.get("base_sha", ""),
                 facts=box.facts())
    golden = golden_for(c, srv)
    if not golden.needed:
        return dbspares.EMPTY, "template1"
    if not golden.ready():
        raise WtboxError(f"The golden database of {box.id} ({golden.name}) is gone (its migrations changed); "
                         "make a new box to get the new one.")
    return golden.hash, golden.name


def _reset_schema(host: Host, box: Box, db: dict[str, Any]) -> dict[str, Any]:
    from worktreebox.providers.postgres.boxdb import ident, sql_text
    from worktreebox.providers.postgres.golden import run_migrate
    from worktreebox.services.boxenv import process_env
    from worktreebox.system import cgroups

    srv = snapshots.server_of(host, box)
    role = db["user"]
    with srv.session(srv.shared_db) as conn:
        conn.execute("SELECT pg_terminate_backend(pid, 2000) FROM pg_stat_activity WHERE usename = %s", (role,))
        with conn.transaction():
            conn.execute(sql_text("DROP SCHEMA IF EXISTS {s} CASCADE", s=ident(role)))
            conn.execute(sql_text("CREATE SCHEMA {s} AUTHORIZATION {s}", s=ident(role)))
    cfg = host.repo_config(box).database
    if cfg.migrate:
        secrets = host.running_secrets(box)
        run_migrate(cfg.migrate, box.path, process_env(box, secrets), box.logs_dir,
                    [db.get("password") or "", *secrets.values()], cgroup=cgroups.Leaf(host.home, box.id,
                                                                                          cgroups.MIGRATE))
    return {"from": "migrations" if cfg.migrate else "empty schema", "spare": False}
