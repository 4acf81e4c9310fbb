"""Mark and sweep (like pre-commit's gc): find every piece of every box, keep what the
registry vouches for, remove the rest.

Why the order matters: `new` inserts its registry row before it makes anything, and `rm`
deletes the row last. So we discover first and read the registry second: anything found
that still has no row is a true orphan, never a box being born.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from worktreebox.box import CREATING, DEGRADED, EXPIRED, FAILED, READY, REMOVING
from worktreebox.errors import WtboxError
from worktreebox.system import git, procs
from worktreebox.system.fsutil import LockBusy, file_lock

if TYPE_CHECKING:
    from worktreebox.host import Host
    from worktreebox.system.cgroups import Cgroups

DEFAULT_GRACE = 600.0


@contextlib.contextmanager
def exclusive_lock(host: Host, *, wait: float) -> Iterator[bool]:
    """Host-wide gc lock; yields False when another gc holds it for longer than `wait`."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(host.home / "gc.lock", timeout=wait, what="gc"))
        except LockBusy:
            yield False
            return
        yield True


def discover_all(host: Host) -> dict[str, list[str]]:
    """box id → names of the resources that hold something of it right now."""
    found: dict[str, list[str]] = {}
    with procs.one_walk():  # the resources that look for processes share one walk of /proc
        for r in host.resources:
            try:
                ids = r.discover(host)
            except WtboxError:
                continue  # e.g. the database is unreachable: nothing of it can be swept now
            for box_id in ids:
                found.setdefault(box_id, []).append(r.name)
    return found


def _owners(boxes: list) -> dict[str, str]:
    """Every name a registry box answers to: its id, and the pool id of a box claimed from the
    warm pool (its running services still carry that name; pool.py)."""
    out = {b.id: b.id for b in boxes}
    for b in boxes:
        if b.alias is not None:
            out.setdefault(b.alias, b.id)
    return out


def find_orphans(host: Host) -> dict[str, list[str]]:
    from worktreebox.providers.sandbox import spares

    found = discover_all(host)
    known = {**_owners(host.list()), **{s: s for s in spares.kept(host.home)}}
    return {i: what for i, what in found.items() if i not in known}


def plan(host: Host, *, grace: float, now: float | None = None, spares: bool = False) -> list[dict]:
    """What gc would do, each with its reason. Reads only. `spares`: the spare sandboxes too."""
    from worktreebox.providers.sandbox import spares as spare_sandboxes

    now = time.time() if now is None else now
    found = discover_all(host)
    listed = host.list()  # read after discover: see the module docstring
    boxes = {b.id: b for b in listed}
    kept = spare_sandboxes.kept(host.home, taken_only=spares)  # read after discover: its record comes first
    known = {**_owners(listed), **{s: s for s in kept}}
    actions: list[dict] = []
    for box_id, what in sorted(found.items()):
        if box_id in known:
            continue
        if box_id.startswith(spare_sandboxes.PREFIX) and box_id not in boxes:
            reason = "spare sandbox (--spares)" if spares else "spare sandbox nobody took: it ended, or its maker died"
        else:
            reason = f"orphan: {', '.join(sorted(what))} with no registry row"
        actions.append({"id": box_id, "action": "remove", "reason": reason})
    for b in boxes.values():
        updated = b.updated_at or b.created_at
        if b.state in (CREATING, REMOVING, FAILED):
            owner = b.data.get("remover" if b.state == REMOVING else "creator")
            if procs.is_alive(owner):
                continue  # a running command owns it
            if now - updated < grace:
                continue
            actions.append({"id": b.id, "action": "remove",
                            "reason": f"stuck in '{b.state}' for {int(now - updated)}s (its command died)"})
        elif b.state in (READY, DEGRADED, EXPIRED) and not b.keep and b.ttl and now - b.last_used_at > b.ttl:
            why = host.unsaved_work(b)
            idle = f"unused for {_human(now - b.last_used_at)} (ttl {_human(b.ttl)})"
            if why:
                actions.append({"id": b.id, "action": "expire", "reason": f"{idle} but it has {why}; kept"})
            else:
                actions.append({"id": b.id, "action": "remove", "reason": f"expired: {idle}"})
    from worktreebox.fleet.pool import stale_boxes

    planned = {a["id"] for a in actions}
    for b in stale_boxes(host):
        if b.id not in planned:
            actions.append({"id": b.id, "action": "remove",
                            "reason": "pooled box whose commit or config no longer matches its repo"})
    return actions


def run(host: Host, *, grace: float = DEFAULT_GRACE, dry_run: bool = False, wait: float = 30.0,
        spares: bool = False) -> dict:
    t0 = time.perf_counter()
    with exclusive_lock(host, wait=wait) as locked:
        if not locked:
            raise WtboxError("Another 'wtbox gc' is running on this host; try again when it is done.")
        if not dry_run:
            for b in host.list():  # a ready box whose supervisor died is degraded, with the reason
                host.notice(b)
            if spares:  # no maker may make one after this gc; what one was making is an orphan now
                from worktreebox.providers.sandbox import spares as spare_sandboxes

                spare_sandboxes.stop_makers(Path(host.home))
        actions = plan(host, grace=grace, spares=spares)
        errors = []
        if not dry_run:
            for a in actions:
                try:
                    if a["action"] == "expire":
                        host.registry.set_state(a["id"], EXPIRED)
                    else:
                        host.destroy_orphan(a["id"])
                    a["done"] = True
                except WtboxError as e:
                    a["done"] = False
                    errors.append(f"{a['id']}: {e}")
            for repo in host.registry.select_repos():
                if Path(repo).is_dir():
                    git.git(repo, "worktree", "prune", check=False)
            _empty_trash(host)
            swept = _sweep_snapshots(host, errors)
            released = _sweep_host_leases(host)
            mounts = _unmount_strays(host, errors)
            if _release_boxes(host):
                mounts.append(str(host.boxes_dir))
            layers = _sweep_layers(host)
            foreign = _sweep_cgroups_of_gone_homes(host, errors)
            router = _sync_router(host, errors)
            routers = _stop_routers_of_gone_homes()
            _stamp(host)
        else:
            released, router, swept = [], None, []
            from worktreebox.router import caddy

            routers = [f"router pid {pid} of {home} (home is gone)" for pid, home in caddy.of_gone_homes()]
            mounts, layers = [m.target for m in stray_mounts(host)], []
            foreign = [f"{hx} of {home} (home is gone)" for home, _, hx in _cgroups_of_gone_homes(host)]
    return {"dry_run": dry_run, "actions": actions, "errors": errors, "released_ports": released, "mounts": mounts,
            "layers": layers, "cgroups": foreign, "snapshots": swept, "router": router,
            "routers": routers, "seconds": round(time.perf_counter() - t0, 3)}


def _sync_router(host: Host, errors: list[str]) -> dict | None:
    """The router serves exactly the live boxes' routes afterwards (a crash may have left one too
    many or too few), and stops when no box has a port: nothing runs for a home with no box."""
    from worktreebox.router import control

    try:
        return control.sync(host, sweep=True)
    except WtboxError as e:
        errors.append(f"router: {e}")
        return None


def _stop_routers_of_gone_homes() -> list[str]:
    """The router of a home deleted while it ran (its boxes' cgroups are swept just above)."""
    from worktreebox.router import caddy

    done = []
    for pid, home in caddy.of_gone_homes():
        try:
            procs.stop_pid(pid)
            done.append(f"router pid {pid} of {home} (home is gone)")
        except PermissionError:  # another user's: theirs to sweep
            continue
    return done


def _sweep_snapshots(host: Host, errors: list[str]) -> list[str]:
    """What killed snapshots, restores and forks left (fleet/snapshots.sweep)."""
    from worktreebox.fleet import snapshots

    return snapshots.sweep(host, errors)


def _cgroups_of_gone_homes(host: Host) -> list[tuple[str, Cgroups, str]]:
    """(home, its cgroups, box hex) of every box cgroup whose home was deleted: nobody else can
    sweep them (see homes.py). Homes never noted (another user's, an older wtbox) are left alone."""
    from worktreebox.system import cgroups
    from worktreebox.system import home_records as homes

    backend = cgroups.for_home(host.home)
    if backend is None:
        return []
    out = []
    for key, hexes in sorted(backend.other_homes().items()):
        home = homes.path_of(key)
        if home is not None and homes.gone(home):
            out += [(home, backend.of_home(key), hx) for hx in sorted(hexes)]
    return out


def _sweep_cgroups_of_gone_homes(host: Host, errors: list[str]) -> list[str]:
    """Kill what still runs in them (it belongs to no box anyone can reach) and remove them."""
    done = []
    for home, backend, hx in _cgroups_of_gone_homes(host):
        try:
            backend.remove(hx, spare=procs.caller_and_ancestors())
            done.append(f"{hx} of {home} (home is gone)")
        except OSError as e:
            errors.append(f"the cgroup of box {hx} of the deleted home {home}: {e}")
    _forget_gone_homes(host)
    return done


def _forget_gone_homes(host: Host) -> None:
    """Drop the notes of deleted homes that have no box cgroup left (they would pile up)."""
    from worktreebox.system import cgroups
    from worktreebox.system import home_records as homes

    backend = cgroups.for_home(host.home)
    left = set(backend.other_homes()) if backend is not None else set()
    for key, home in homes.noted().items():
        if key not in left and homes.gone(home):
            homes.forget(key)


def _sweep_host_leases(host: Host) -> list[int]:
    """Host-wide port claims of this home that its registry no longer knows, and claims of
    homes that are gone (see leases.py)."""
    from worktreebox.system.leases import HostLeases

    return HostLeases(host.home).sweep(host.registry.lease_owners(), host.registry.leased_ports())


def stray_mounts(host: Host) -> list:
    """Mounts under $WTBOX_HOME that no box in the registry owns (deepest first)."""
    from worktreebox.box import is_box_id
    from worktreebox.providers.mounts.base import mounts_under

    found = mounts_under(host.home)
    if not found:
        return []
    known = host.registry.select_box_ids()
    boxes = str(host.boxes_dir) + "/"
    out = []
    for m in found:
        if m.target == str(host.boxes_dir):
            continue  # boxes/ itself, shared for sandboxes: released once no box is left (_release_boxes)
        owner = m.target[len(boxes):].split("/", 1)[0] if m.target.startswith(boxes) else None
        if owner is None or not is_box_id(owner) or owner not in known:
            out.append(m)
    return out


def _release_boxes(host: Host) -> bool:
    """boxes/, made a shared mount for sandboxes, taken down once no box (and no spare) is left."""
    from worktreebox.providers.sandbox import release_boxes_dir

    return release_boxes_dir(host.home, lambda: not host.registry.select_box_ids())


def _unmount_strays(host: Host, errors: list[str]) -> list[str]:
    """Mounts left by probes or by boxes whose teardown was cut short; and the probe dirs."""
    from worktreebox.providers import mounts
    from worktreebox.providers.mounts.base import unmount

    done = []
    for m in stray_mounts(host):
        try:
            unmount(m)
            done.append(m.target)
        except WtboxError as e:
            errors.append(str(e))
    for probe in mounts.stale_probes(host.home):
        mounts.clean_probe(probe)
    return done


def _sweep_layers(host: Host) -> list[str]:
    """Pristine trees and dependency layers no box uses, unused for [host] layer_ttl; half-built ones."""
    from worktreebox.layers.deps import sweep_scans
    from worktreebox.layers.store import sweep_all

    sweep_scans(host.home, host.config.layer_ttl)
    return sweep_all(host.home, host.boxes_dir, host.config.layer_ttl)


def _empty_trash(host: Host) -> None:
    """Worktrees `rm` moved aside for a background delete that may have died (kill -9, reboot)."""
    import shutil

    from worktreebox.resources.worktree import trash_dir

    if trash_dir(host).exists():
        for entry in trash_dir(host).iterdir():
            shutil.rmtree(entry, ignore_errors=True)


def _human(seconds: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{seconds / n:.0f}{unit}"
    return f"{seconds:.0f}s"


def _stamp(host: Host) -> None:
    (host.home / ".last-gc").touch()


def start_background_gc(home: Path) -> None:
    """Start a detached `wtbox gc` (the CLI decides when: at most once an hour)."""
    import sys

    stamp = home / ".last-gc"
    try:
        stamp.touch()  # claim this hour before starting, so concurrent commands don't all start one
        procs.spawn([sys.executable, "-m", "worktreebox.cli.main", "gc", "--quiet"],
                    env={**os.environ, "WTBOX_HOME": str(home), "WTBOX_NO_AUTO_GC": "1"})
    except OSError:
        pass
