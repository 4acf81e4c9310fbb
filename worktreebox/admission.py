"""Admission: `new` and `fanout` wait (or, with --no-wait, refuse) while the host is full,
instead of starting one box too many and making every box slow.

Two guards, both off unless the host config sets them:
- `[host] max_active`: boxes that are being made or run processes now (their cgroup holds
  processes; on a host without cgroups, a process carries their WTBOX_ID). A box whose
  services are down costs nothing and does not count.
- `[host] max_load`: the 1-minute load average (as `make --load-average` uses it).

The check and the registry row of the new box happen under one lock, so several waiting
`new`s take free slots one at a time, never two for the last one.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from worktreebox.box import CREATING, EXPIRED, READY
from worktreebox.errors import WtboxError
from worktreebox.system import cancel, cgroups, procs
from worktreebox.system.fsutil import file_lock

if TYPE_CHECKING:
    from worktreebox.context import HostContext

POLL = 1.0  # seconds between looks while waiting
OWN_LEAVES = ("_sandbox", cgroups.SUPERVISOR, cgroups.METRICS, cgroups.TRACES)  # of a box's cgroup: wtbox's


class HostFull(WtboxError):
    """The host has no room for another box right now and the caller asked not to wait."""


def active_boxes(host: HostContext) -> list[str]:
    """Ids of the boxes that count against [host] max_active."""
    backend = cgroups.for_home(host.home)
    by_env: set[str] | None = None  # boxes with live processes by WTBOX_ID: one /proc scan, when needed
    out = []
    for b in host.list():
        if b.state == CREATING:
            if procs.is_alive(b.data.get("creator")):
                out.append(b.id)
        elif b.state in (READY, EXPIRED):
            if backend is not None and backend.exists(b.id):
                # wtbox's own processes of a box (its sandbox, supervisor, metrics store) cost nothing idle
                running = bool(backend.pids(b.id) - set().union(*(backend.pids(b.id, leaf) for leaf in OWN_LEAVES)))
            else:
                if by_env is None:
                    by_env = procs.discover_box_ids(host.boxes_dir)
                running = b.id in by_env
            if running:
                out.append(b.id)
    return out


def why_full(host: HostContext, more: int = 1) -> str | None:
    """What keeps `more` new boxes out right now (a clause for a sentence), or None when they fit."""
    cfg = host.config
    if cfg.max_active is not None:
        active = len(active_boxes(host))
        if active + more > cfg.max_active:
            return (f"{active} of its [host] max_active = {cfg.max_active} boxes are active"
                    + (f" and {more} more were asked for" if more > 1 else ""))
    if cfg.max_load is not None:
        load = os.getloadavg()[0]
        if load > cfg.max_load:
            return f"its 1-minute load average is {load:.2f}, above [host] max_load = {cfg.max_load:g}"
    return None


def check(host: HostContext, more: int = 1) -> None:
    """Raise HostFull when `more` new boxes do not fit now (fanout --no-wait asks once for all of them)."""
    why = why_full(host, more)
    if why:
        raise HostFull(f"This host is full: {why}; remove or stop a box ('wtbox rm', 'wtbox down') "
                       "or leave out --no-wait to wait for room.")


@contextlib.contextmanager
def admitted(host: HostContext, *, wait: bool = True, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold a slot while the body registers the new box: waits for room (telling `on_wait`, by
    default stderr, once per change), or raises HostFull when `wait` is False."""
    cfg = host.config
    if cfg.max_active is None and cfg.max_load is None:
        yield
        return
    said = None
    while True:
        with file_lock(host.home / "admission.lock", what="the admission lock"):
            why = why_full(host)
            if why is None:
                yield
                return
            if not wait:
                check(host)
        if why.split(" ")[:3] != (said or "").split(" ")[:3]:  # say it again when the kind of reason changes
            (on_wait or _stderr)(f"waiting for room on this host: {why} (Ctrl-C to give up)")
            said = why
        cancel.sleep(POLL)


def _stderr(msg: str) -> None:
    print(f"wtbox: {msg}", file=sys.stderr, flush=True)
