"""Snapshots of a box's own changes: its files (upper layers, git's index, its branch tip), its
database's content, and which services ran. README, "State", has the picture.

    boxes/<id>/snapshots/<name>/   meta.json, upper/, deps/<i.j>/upper/, index
    wt_<hex>_s_<token>             the database's copy (providers/postgres/boxcopy.py)

A snapshot is taken in `.tmp-<token>/` and renamed into place once whole (meta.json is written
last). The box is frozen (its cgroup's freezer, leaf by leaf) while its files and database are
copied, so the two are one instant of the box; `paused_ms` says how long. An operation in progress
names its owner and its databases in `op.json`: after a kill -9, gc removes the half-made dir and
drops the databases no finished snapshot names, and thaws a box a dead snapshot left frozen.
Snapshots live in the box dir, so they go with the box (`rm` drops their databases with it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worktreebox.box import DEGRADED, READY, Box
from worktreebox.errors import NotFound, UsageError, WtboxError
from worktreebox.resources import own_changes
from worktreebox.system import cgroups, procs
from worktreebox.system.fsutil import atomic_write, file_lock

if TYPE_CHECKING:
    from worktreebox.host import Host
    from worktreebox.providers.postgres.base import Server

DIR = "snapshots"
META, OP = "meta.json", "op.json"
TMP_PREFIX = ".tmp-"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclasses.dataclass
class Snapshot:
    dir: Path
    meta: dict[str, Any]

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def database(self) -> str | None:
        return (self.meta.get("database") or {}).get("copy")

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.meta.items() if k != "database"} | {
            "database": {k: v for k, v in (self.meta.get("database") or {}).items() if k != "role"} or None}


def root(box: Box) -> Path:
    return box.dir / DIR


@contextlib.contextmanager
def box_lock(box: Box) -> Iterator[None]:
    """One snapshot, restore or fork-from at a time per box."""
    with file_lock(root(box) / ".lock", timeout=120, what=f"the snapshot lock of {box.id}"):
        yield


# ---------------------------------------------------------------- an operation in progress (for gc)

@contextlib.contextmanager
def operation(box: Box, databases: list[str]) -> Iterator[Path]:
    """A scratch dir whose op.json names this process and the databases it may leave; removed after."""
    token = secrets.token_hex(3)
    scratch = root(box) / f"{TMP_PREFIX}{token}"
    scratch.mkdir(parents=True)
    atomic_write(scratch / OP, json.dumps({"owner": procs.identity(os.getpid()), "databases": databases}))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _live_op(scratch: Path) -> dict[str, Any] | None:
    try:
        op = json.loads((scratch / OP).read_text())
    except (OSError, ValueError):
        return None
    return op if procs.is_alive(op.get("owner")) else None


# ---------------------------------------------------------------- freezing

@dataclasses.dataclass
class Pause:
    frozen: bool = False
    ms: float = 0.0


@contextlib.contextmanager
def frozen(host: Host, box: Box) -> Iterator[Pause]:
    """The box's processes stopped in place for the block (none without cgroups: `frozen` False).
    Measured: freezing and thawing a box of a few processes costs ~1 ms each (cgroup v1)."""
    backend = cgroups.for_home(host.home)
    pause = Pause()
    t0 = time.perf_counter()
    if backend is not None and backend.exists(box.id):
        pause.frozen = bool(backend.freeze(box.id, True, spare=procs.caller_and_ancestors()))
    try:
        yield pause
    finally:
        if backend is not None and pause.frozen:
            backend.freeze(box.id, False)
        pause.ms = round((time.perf_counter() - t0) * 1000, 1)


# ---------------------------------------------------------------- taking, listing, removing

def check_box(box: Box) -> None:
    """Refuse what a snapshot cannot hold, with one sentence."""
    if box.state not in (READY, DEGRADED):
        raise WtboxError(f"{box.id} is {box.state}; a snapshot needs a ready box"
                         + (f" (run 'wtbox restore {box.id} {box.data['restoring']['snapshot']}' to finish its "
                            "restore)" if box.data.get("restoring") else "") + ".")
    own_changes.check(box)
    mode = (box.data.get("database") or {}).get("mode")
    if mode == "schema":
        raise WtboxError(f"{box.id} keeps its data in a schema of a shared database, which PostgreSQL cannot copy "
                         "as a whole; snapshots and forks need [database] mode = \"database\" in wtbox.toml.")


def take(host: Host, box: Box, name: str | None = None, *, internal: bool = False) -> Snapshot:
    """Freeze the box's own changes as snapshot NAME (default snap-<n>). `internal`: a fork's own,
    named `.fork-<token>`, hidden from the list and owned by this process (gc removes it if it dies)."""
    check_box(box)
    if name is not None:
        check_name(name)
    root(box).mkdir(exist_ok=True)
    with box_lock(box):
        name = f".fork-{secrets.token_hex(3)}" if internal else name or _next_name(box)
        if (root(box) / name).exists():
            raise UsageError(f"{box.id} already has a snapshot {name!r}; pick another name or remove it "
                             f"('wtbox snapshot {box.id} --rm {name}').")
        return _take(host, box, name, internal)


def _take(host: Host, box: Box, name: str, internal: bool = False) -> Snapshot:
    from worktreebox.providers.postgres import boxcopy

    db = box.data.get("database") or {}
    copy = boxcopy.copy_name(box.pg_name, boxcopy.SNAPSHOT) if db.get("mode") == "database" else None
    srv = server_of(host, box) if copy else None
    services = running_services(box)
    t0 = time.perf_counter()
    with operation(box, [copy] if copy else []) as scratch:
        phase("snapshot:op")
        strategy = None
        if srv:  # chosen before the pause: the size read costs ~1 ms, the wrong choice ~100 ms per 60 MB
            measured = clone_strategy(srv, box)
            with srv.session(srv.shared_db) as conn:
                strategy = boxcopy.strategy_for(conn, db["name"], measured)
        with frozen(host, box) as pause:
            phase("snapshot:frozen")
            tip, files_ms, copy_ms = _copy_frozen(box, scratch, srv, db.get("name"), copy, strategy)
            phase("snapshot:files")
        from worktreebox.providers import sandbox

        sandbox.bring_back(box)  # a sandboxed box's tip is in its own git dir: its forks branch from it here
        if srv and copy:
            with srv.session(srv.shared_db) as conn:
                boxcopy.freeze_copy(conn, copy)
        meta = {"name": name, "box": box.id, "created_at": time.time(), "tree": box.data["worktree"]["tree"],
                "tip": tip, "pristine": own_changes.pristine_copy(host, box, scratch, tip), "services": services,
                "frozen": pause.frozen, "paused_ms": pause.ms, "files_ms": files_ms, "copy_ms": copy_ms,
                "files_bytes": own_changes.disk_bytes(scratch),
                "database": {"copy": copy, "role": box.pg_name, "strategy": strategy,
                             "bytes": boxcopy.size_bytes(srv, copy)} if srv and copy else None}
        if internal:
            meta["owner"] = procs.identity(os.getpid())
        atomic_write(scratch / META, json.dumps(meta, indent=1))
        phase("snapshot:meta")
        (scratch / OP).unlink()
        os.rename(scratch, root(box) / name)  # the snapshot exists from here on
        phase("snapshot:done")
    meta["seconds"] = round(time.perf_counter() - t0, 3)
    return Snapshot(root(box) / name, meta)


def _copy_frozen(box: Box, scratch: Path, srv: Server | None, source: str | None, copy: str | None,
                 strategy: str | None) -> tuple[str, float, float | None]:
    """With the box frozen: its files copied in a thread while PostgreSQL copies its database, so the
    pause is the longer of the two, not their sum (the files: 5-30 ms of `cp -a` here). (tip, ms each)."""
    from concurrent.futures import ThreadPoolExecutor

    from worktreebox.providers.postgres import boxcopy

    def files() -> tuple[str, float]:
        t = time.perf_counter()
        tip = own_changes.save(box, scratch)
        return tip, round((time.perf_counter() - t) * 1000, 1)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot-files") as pool:
        saved = pool.submit(files)
        copy_ms = None
        if srv and source and copy:
            t = time.perf_counter()
            with srv.session(srv.shared_db) as conn:
                boxcopy.copy_database(conn, source, copy, strategy=strategy)
            copy_ms = round((time.perf_counter() - t) * 1000, 1)
        tip, files_ms = saved.result()
    return tip, files_ms, copy_ms


def phase(name: str) -> None:
    from worktreebox.host import _phase as _host_phase  # the crash-test hooks of Host.new

    _host_phase(name)


def check_name(name: str) -> None:
    if not _NAME.match(name):
        raise UsageError(f"The snapshot name {name!r} is not usable; use letters, digits, '.', '_' or '-' "
                         "(up to 64, starting with a letter or digit).")


def _next_name(box: Box) -> str:
    n = 1
    while (root(box) / f"snap-{n}").exists():
        n += 1
    return f"snap-{n}"


def listed(box: Box) -> list[Snapshot]:
    """The box's finished snapshots, oldest first."""
    out = []
    for d in root(box).iterdir() if root(box).is_dir() else []:
        if d.name.startswith(TMP_PREFIX) or not d.is_dir():
            continue
        try:
            out.append(Snapshot(d, json.loads((d / META).read_text())))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda s: s.meta.get("created_at", 0))


def shown(box: Box) -> list[Snapshot]:
    """The snapshots a user took (not the ones a fork in progress holds)."""
    return [s for s in listed(box) if "owner" not in s.meta]


def get(box: Box, name: str) -> Snapshot:
    found = next((s for s in listed(box) if s.name == name), None)
    if found is None:
        names = ", ".join(s.name for s in shown(box)) or "none"
        raise NotFound(f"{box.id} has no snapshot {name!r} (it has: {names}); 'wtbox snapshot {box.id}' takes one.")
    return found


def remove(host: Host, box: Box, name: str) -> dict[str, Any]:
    with box_lock(box):
        snap = get(box, name)
        _drop(host, box, snap)
    return {"box": box.id, "removed": name}


def _drop(host: Host, box: Box, snap: Snapshot) -> None:
    from worktreebox.providers.postgres import boxcopy

    # the database first: a dir without its copy is still a snapshot gc would keep; a copy without a dir is swept
    if snap.database:
        boxcopy.drop_database(server_of(host, box), snap.database)
    gone = snap.dir.with_name(f"{TMP_PREFIX}{snap.name}-gone")
    os.rename(snap.dir, gone)
    shutil.rmtree(gone, ignore_errors=True)


def running_services(box: Box) -> list[str]:
    from worktreebox.services.client import services_status

    return sorted(n for n, row in services_status(box).items() if row["state"] not in ("stopped", "failed"))


def clone_strategy(srv: Server, box: Box) -> str | None:
    """How copies of this box's data are made: as its golden copy measured fastest (WAL_LOG or FILE_COPY)."""
    from worktreebox.providers.postgres.golden import GOLDEN_PREFIX, STRATEGIES

    template = ((box.data.get("database") or {}).get("golden") or {}).get("template") or ""
    if not template.startswith(GOLDEN_PREFIX):
        return None
    with srv.session(srv.shared_db) as conn:
        row = conn.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                           (template,)).fetchone()
    try:
        strategy = json.loads(row[0])["strategy"] if row else None
    except (TypeError, ValueError, KeyError):
        return None
    return strategy if strategy in STRATEGIES else None


def server_of(host: Host, box: Box) -> Server:
    return host.database_server((box.data.get("database") or {}).get("provider"))


# ---------------------------------------------------------------- gc

def sweep(host: Host, errors: list[str]) -> list[str]:
    """What killed snapshots, restores and forks left: scratch dirs of dead operations, database copies
    no finished snapshot names, boxes left frozen. Returns what was removed."""
    done: list[str] = []
    keep: set[str] = set()
    backend = cgroups.for_home(host.home)
    for box in host.list():
        live = _sweep_box_dir(box, keep, done)
        if not live and backend is not None and backend.exists(box.id) and backend.frozen(box.id):
            backend.freeze(box.id, False)
            done.append(f"thawed {box.id}")
    done += _sweep_copies(host, keep, errors)
    return done


def _sweep_box_dir(box: Box, keep: set[str], done: list[str]) -> bool:
    """Remove dead scratch dirs of one box and the internal snapshots of dead forks; add the
    databases its snapshots and live operations name to `keep`; True when an operation is running
    on it. Operations are read before snapshots: one that finishes meanwhile is seen as either."""
    live = False
    for scratch in root(box).glob(f"{TMP_PREFIX}*") if root(box).is_dir() else []:
        op = _live_op(scratch)
        if op is not None:
            live = True
            keep.update(op.get("databases") or [])
            continue
        shutil.rmtree(scratch, ignore_errors=True)
        done.append(str(scratch))
    for snap in listed(box):
        owner = snap.meta.get("owner")
        if owner is not None and not procs.is_alive(owner):  # a fork's own snapshot, its fork killed
            shutil.rmtree(snap.dir, ignore_errors=True)
            done.append(str(snap.dir))
            continue
        live = live or owner is not None
        keep.add(snap.database or "")
    return live


def _sweep_copies(host: Host, keep: set[str], errors: list[str]) -> list[str]:
    """Drop copies no snapshot or operation names: of a box of this home (its hex), or any on a
    server that is this home's alone (embedded, docker); a shared server's other copies are not ours."""
    from worktreebox.box import hex_of
    from worktreebox.providers.postgres import boxcopy

    done: list[str] = []
    ours = {f"wt_{hex_of(b.id)}" for b in host.list()}
    try:
        srv = host.database_server()
        if srv.provider != "external" and not srv.is_running():
            return done
        for name in boxcopy.copies(srv):
            mine = srv.provider != "external" or name[:11] in ours
            if mine and name not in keep:
                boxcopy.drop_database(srv, name)
                done.append(name)
    except WtboxError as e:
        errors.append(f"snapshot databases: {e}")
    return done
