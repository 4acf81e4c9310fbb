"""Stopping processes, by one policy: SIGTERM, wait up to KILL_WAIT, SIGKILL, wait until gone.

Names say which: `stop_*` is that staged stop; `kill_*` is SIGKILL at once, for what gets no say
(orphans of a killed child, what is left in a box's cgroup). Every stop waits until the
processes are gone, not merely reaped. The one setting is WTBOX_KILL_WAIT (settings.kill_wait,
5 s); a `wait=` argument overrides it only for a process that has work to finish on SIGTERM
(the supervisor stopping its services, the pool's filler rolling back its box).
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from worktreebox.settings import kill_wait
from worktreebox.system import cgroups, procfs
from worktreebox.system.procs.find import cgroup_pids, find_box_processes, find_named, from_pid_file
from worktreebox.system.procs.identity import caller_and_ancestors, pid_alive


def _grace(wait: float | None) -> float:
    return kill_wait() if wait is None else wait


def signal_group(pgid: int | None, sig: int) -> bool:
    """Signal a whole process group, quietly; False when it is gone (or not ours)."""
    if not pgid or pgid <= 1:
        return False
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def wait_gone(procs: Iterable[Any], timeout: float) -> list[Any]:
    """Wait until the processes (psutil objects, Popen objects or pids) are dead; returns the
    ones still alive. A zombie counts as dead, and is reaped when it is our child: psutil's
    wait_procs would wait for a reaping that a slow pid 1 may take seconds to do."""
    deadline = time.monotonic() + timeout
    alive = list(procs)
    while alive:
        alive = [p for p in alive if _still_alive(p)]
        if not alive or time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    return alive


def _still_alive(p: Any) -> bool:
    """Reap `p` if it is our child and has ended; whether it still runs."""
    pid = p if isinstance(p, int) else p.pid
    if isinstance(p, subprocess.Popen):
        p.poll()
    else:
        try:
            os.waitpid(pid, os.WNOHANG)
        except (ChildProcessError, OSError):
            pass
    return pid_alive(pid)


def stop_processes(procs: Iterable[Any], wait: float | None = None) -> list[int]:
    """Staged stop of found processes (psutil objects, e.g. from find_box_processes), and the whole
    groups of those that lead one. Returns their pids."""
    procs = [p for p in procs if p.pid != os.getpid()]
    if not procs:
        return []
    pids = {p.pid for p in procs}
    own_pgid = os.getpgid(0)

    def send(sig: int, targets: list[Any]) -> None:
        for p in targets:
            try:
                pgid = os.getpgid(p.pid)
            except ProcessLookupError:
                continue
            # Signal a whole group only when its leader is one of ours: a stray that joined
            # someone else's group (a user's shell) must not take that group down with it.
            if not (pgid in pids and pgid != own_pgid and signal_group(pgid, sig)):
                _signal(p.pid, sig)

    _staged(procs, send, _grace(wait))
    return sorted(pids)


def _staged(procs: list[Any], send: Any, wait: float) -> None:
    """The policy itself: SIGTERM, wait, SIGKILL what is left, wait until it is gone."""
    send(signal.SIGTERM, procs)
    alive = wait_gone(procs, wait)
    if alive:
        send(signal.SIGKILL, alive)
        wait_gone(alive, wait)


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def stop_groups(procs: Iterable[subprocess.Popen | int], wait: float | None = None) -> None:
    """Staged stop of several process groups at once (each led by a process started with `spawn`).
    SIGKILL goes to every group, also of leaders that ended (stragglers in their groups). Stopping
    N groups costs one `wait`, not N."""
    procs = [p for p in procs if p]

    def send(sig: int, _targets: list[Any]) -> None:
        for p in procs:
            signal_group(p if isinstance(p, int) else p.pid, sig)

    grace = _grace(wait)
    send(signal.SIGTERM, procs)
    wait_gone(procs, grace)
    send(signal.SIGKILL, procs)
    wait_gone(procs, grace)


def stop_group(proc: subprocess.Popen | int | None, wait: float | None = None) -> None:
    """Staged stop of one process group (see stop_groups)."""
    if proc:
        stop_groups([proc], wait)


def stop_pid(pid: int | None, wait: float | None = None) -> bool:
    """Staged stop of one process (not its group). True when it is gone."""
    if not pid or not pid_alive(pid):
        return True
    _staged([pid], lambda sig, targets: [_signal(p, sig) for p in targets], _grace(wait))
    return not pid_alive(pid)


def stop_named(box_id: str, *, run_dir: Path, names: Iterable[str], pid_files: Iterable[str],
               wait: float | None = None) -> None:
    """Staged stop of a box's detached processes named `names`: those in the pid files (under
    run_dir), then any found by WTBOX_ID; the pid files are removed."""
    names, pid_files = tuple(names), tuple(pid_files)
    found = [p for f in pid_files if (p := from_pid_file(run_dir / f, box_id, names)) is not None]
    known = {p.pid for p in found}
    found += [q for q in find_named(box_id, names, box_dir=run_dir.parent) if q.pid not in known]
    if found:
        stop_processes(found, wait)
    for f in pid_files:
        (run_dir / f).unlink(missing_ok=True)


def kill_mentioning(text: str, wait: float | None = None) -> list[int]:
    """SIGKILL processes whose command line contains `text` (orphans of a killed child), and wait."""
    needle = text.encode()
    me = os.getpid()
    victims = [pid for pid in procfs.pids()
               if pid != me and needle in (procfs.cmdline_bytes(pid) or b"") and _signal(pid, signal.SIGKILL)]
    wait_gone(victims, _grace(wait))
    return victims


# ---------------------------------------------------------------- a box's cgroup

def kill_cgroup(home: Path | str, box_id: str, leaf: str | None = None) -> set[int]:
    """SIGKILL everything in the box's cgroup (or one leaf), sparing ourselves and our ancestors,
    and wait until it is empty. Returns the pids killed (none without cgroups)."""
    backend = cgroups.for_home(home)
    if backend is None:
        return set()
    return backend.kill(box_id, leaf, spare=caller_and_ancestors())


def stop_cgroup(home: Path | str, box_id: str, leaves: Sequence[str | None] = (None,),
                wait: float | None = None) -> set[int]:
    """Staged stop of everything in the box's cgroup, or in some of its leaves: SIGTERM each
    process (daemons in their own session too), one wait of up to `wait`, then kill the cgroups."""
    members: set[int] = set()
    for leaf in leaves:
        members |= cgroup_pids(home, box_id, leaf)
    members -= caller_and_ancestors()
    for pid in members:
        _signal(pid, signal.SIGTERM)
    wait_gone(members, _grace(wait))
    for leaf in leaves:
        members |= kill_cgroup(home, box_id, leaf)
    return members


def remove_box_cgroup(home: Path | str, box_id: str) -> None:
    """Kill what is left in the box's cgroup and delete it (leaves first)."""
    backend = cgroups.for_home(home)
    if backend is not None:
        backend.remove(box_id, spare=caller_and_ancestors())


def end_box_processes(home: Path | str, box_id: str, box_dir: Path | str | None) -> list[int]:
    """Every process of a box, gone: its cgroup killed first (exact), then what still carries
    WTBOX_ID or sits in the box dir (the second net, and the only one without cgroups)."""
    killed = kill_cgroup(home, box_id)
    strays = find_box_processes(box_id, box_dir)
    return sorted(killed | set(stop_processes(strays) if strays else []))
