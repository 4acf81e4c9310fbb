"""`wtbox fork BOX -n N`: N new boxes whose own changes start as BOX's (now, or a snapshot of it).

Each fork is an ordinary box made by `Host.new` from BOX's commit and config, with an origin
(resources/base.Origin): its worktree view starts with the snapshot's upper layers and index, its
branch `wtbox/<its id>` at BOX's branch tip, its database a copy of the snapshot's; setup and
`[box] copy` are skipped (their results are in the files). Everything else is its own, named after
its own id: ports, role, database, cgroup, metrics, services started and ready.

Forking from BOX's current state takes an internal snapshot first (owned by this process; gc removes
it if the fork is killed) and removes it afterwards. The forks are made in parallel; if one fails,
the others are removed too and the first error is raised: a fork of N gives N boxes or none.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worktreebox.box import Box, slugify
from worktreebox.errors import WtboxError
from worktreebox.fleet import snapshots
from worktreebox.resources.base import Origin
from worktreebox.system import cancel

if TYPE_CHECKING:
    from worktreebox.host import Host


def origin_of(snap: snapshots.Snapshot, *, take: bool = False) -> Origin:
    """The origin of a fork made from `snap`; `take`: this fork renames the snapshot's database to its own
    (one copy fewer: the last use of a fork's own snapshot)."""
    db = snap.meta.get("database") or {}
    return Origin(files=snap.dir, tip=snap.meta["tip"], database=db.get("copy"), database_role=db.get("role"),
                  strategy=db.get("strategy"), take_database=take and bool(db.get("copy")))


def tasks(source: Box, n: int, task: str | None) -> list[str]:
    """The forks' task names: TASK (default: BOX's task + "-fork"), numbered when there are several."""
    base = task or f"{source.task}-fork"
    names = [base] if n == 1 else [f"{base}-{i}" for i in range(1, n + 1)]
    for name in names:
        slugify(name)
    return names



def fork(host: Host, source: Box, n: int = 1, task: str | None = None, from_snapshot: str | None = None, *,
         progress: Callable[[str], None] | None = None, new_host: Callable[[Path], Host] | None = None,
         ttl: float | None = None, use_pool: bool = True) -> list[Box]:
    """N boxes starting from SOURCE's current state (or its snapshot `from_snapshot`)."""
    if n < 1:
        raise WtboxError("A fork makes at least one box.")
    names = tasks(source, n, task)
    snapshots.check_box(source)
    live = len(host.registry.select_box_ids())
    if n > host.config.max_boxes - live:
        raise WtboxError(f"A fork of {n} boxes does not fit: this host has {live} of its {host.config.max_boxes} "
                         "boxes ([host] max_boxes); remove boxes or ask for fewer.")
    t0 = time.perf_counter()
    snap = snapshots.get(source, from_snapshot) if from_snapshot else snapshots.take(host, source, internal=True)
    snapshot_s = time.perf_counter() - t0
    snapshots.phase("fork:snapshot")
    try:
        made = make_forks(host, source, snap, names, progress=progress, new_host=new_host, ttl=ttl,
                          use_pool=use_pool)
    finally:
        if not from_snapshot:
            with cancel.unwatched():  # also after a cancelled fork
                snapshots.remove(host, source, snap.name)
    for b in made:
        b.data.setdefault("timings", {})["snapshot"] = round(snapshot_s, 4)
    return made


def make_forks(host: Host, source: Box, snap: snapshots.Snapshot, names: list[str], *,
               progress: Callable[[str], None] | None = None,
               new_host: Callable[[Path], Host] | None = None, ttl: float | None = None,
               use_pool: bool = True) -> list[Box]:
    """One box per task name from `snap`, in parallel, each through its own Host (own registry
    connection, as a separate `wtbox new`); all or none."""
    from concurrent.futures import ThreadPoolExecutor

    from worktreebox.config.load import load_config_for_new

    tree = snap.meta["tree"]
    config = load_config_for_new(Path(source.repo), tree, explicit_ref=True)
    # A fork's own snapshot is used up: a single fork takes its database (a rename instead of a copy).
    # Several copy it at once (one renaming it could do so before the others began their copies).
    take = snap.meta.get("owner") is not None and len(names) == 1
    origins = {name: origin_of(snap, take=take) for name in names}
    opener = new_host or type(host)

    def one(name: str) -> Box:
        h = opener(host.home)
        try:
            box = from_pool(h, snap, name, origins[name], ttl=ttl) if use_pool else None
            box = box or h.new(name, repo=source.repo, ref=tree, config=config, origin=origins[name], ttl=ttl,
                               progress=(lambda m: progress(f"{name}: {m}")) if progress else None)
            box.data["fork"] = {"from": source.id, "snapshot": None if snap.meta.get("owner") else snap.name,
                                "tip": snap.meta["tip"]}
            h.registry.save_box(box)
            return box
        finally:
            h.registry.close()

    with ThreadPoolExecutor(max_workers=len(names), thread_name_prefix="fork") as pool:
        futures = [pool.submit(one, name) for name in names]
        results: list[Box | BaseException] = []
        for f in futures:
            try:
                results.append(f.result())
            except BaseException as e:  # every fork is waited for
                results.append(e)
    failed = [r for r in results if isinstance(r, BaseException)]
    made = [r for r in results if isinstance(r, Box)]
    if failed:
        for b in made:  # also when the others were cancelled: rm's destruction is never cancelled
            host.rm(b, force=True)
        first = failed[0]
        if isinstance(first, WtboxError):
            raise first
        raise WtboxError(f"Forking {source.id} failed ({type(first).__name__}: {first}); no fork was left.") from first
    return made


def from_pool(host: Any, snap: snapshots.Snapshot, name: str, origin: Origin, *, ttl: float | None = None
              ) -> Box | None:
    """A pooled box of the snapshot's commit and config, its database replaced by the snapshot's copy
    before it is reported ready: its services are up already, so the fork answers as soon as their
    sessions reconnect. Only for a snapshot whose files are the tree's (`pristine`): a pooled box's
    services run the pristine files, and would serve stale ones for a box whose files changed (making
    them serve the changed ones is their restart, which is their whole start time). None: no such box."""
    from worktreebox.fleet import pool

    if not snap.meta.get("pristine"):
        return None
    source = host.registry.select_box(snap.meta["box"])
    if source is None:
        return None
    target = pool.resolve_target(source.repo, snap.meta["tree"], explicit_ref=True, home=host.home)
    if target.why_not or pool.desired_size(host, target.repo, target.config) <= 0:
        return None
    box = pool.claim(host, name, target, ttl=ttl, before_ready=lambda b: _put_data(host, b, origin))
    pool.ensure_filler(host, target.repo)
    return box


def _put_data(host: Any, box: Box, origin: Origin) -> None:
    """The snapshot's data in the claimed box's place (a copy swapped in while the box is frozen)."""
    from worktreebox.providers.postgres import boxcopy
    from worktreebox.providers.postgres.boxdb import ident, sql_text

    db = box.data.get("database") or {}
    if not origin.database or db.get("mode") != "database":
        return
    srv = snapshots.server_of(host, box)
    incoming = boxcopy.copy_name(box.pg_name, boxcopy.INCOMING)
    with snapshots.operation(box, [incoming]):
        with srv.session(srv.shared_db) as conn:
            if origin.take_database:
                conn.execute(sql_text("ALTER DATABASE {s} RENAME TO {d}", s=ident(origin.database), d=ident(incoming)))
            else:
                boxcopy.copy_database(conn, origin.database, incoming, end_source_sessions=False,
                                      strategy=boxcopy.strategy_for(conn, origin.database, origin.strategy))
        boxcopy.hand_to_box(srv, incoming, db["user"], reassign_from=origin.database_role,
                            shared_owner=origin.database_role)
        with snapshots.frozen(host, box):
            _, outgoing = boxcopy.swap_in(srv, db["name"], incoming)
    boxcopy.drop_later(host.home, srv.provider, [outgoing])
