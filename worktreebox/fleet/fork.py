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

if TYPE_CHECKING:
    from worktreebox.context import HostContext
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
         progress: Callable[[str], None] | None = None, new_host: Callable[[Any], HostContext] | None = None,
         ttl: float | None = None) -> list[Box]:
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
        made = make_forks(host, source, snap, names, progress=progress, new_host=new_host, ttl=ttl)
    finally:
        if not from_snapshot:
            snapshots.remove(host, source, snap.name)
    for b in made:
        b.data.setdefault("timings", {})["snapshot"] = round(snapshot_s, 4)
    return made


def make_forks(host: Host, source: Box, snap: snapshots.Snapshot, names: list[str], *,
               progress: Callable[[str], None] | None = None,
               new_host: Callable[[Any], HostContext] | None = None, ttl: float | None = None) -> list[Box]:
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
            box = h.new(name, repo=source.repo, ref=tree, config=config, origin=origins[name], ttl=ttl,
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
        for b in made:
            host.rm(b.id, force=True)
        first = failed[0]
        if isinstance(first, WtboxError):
            raise first
        raise WtboxError(f"Forking {source.id} failed ({type(first).__name__}: {first}); no fork was left.") from first
    return made
