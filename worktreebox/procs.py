"""Finding and ending a box's processes, including daemons that escaped their process group.

Every process a box starts carries WTBOX_ID=<id> in its environment (inherited by
children and double-forked daemons alike), and most run with a cwd inside the box,
so given an id the kernel can tell us exactly which processes belong to it.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Iterable

KILL_WAIT = 5.0


def _protected() -> set[int]:
    """Ourselves and our ancestors: `wtbox rm` run from a shell inside the box must not kill that shell."""
    out = set()
    pid = os.getpid()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            pid = int(stat[stat.rfind(b")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def _environ_id(pid: int) -> str | None:
    """WTBOX_ID from /proc/<pid>/environ, read directly: much faster than psutil for a full scan."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read()
    except OSError:  # gone, a kernel thread, or not ours to read
        return None
    i = data.find(b"WTBOX_ID=")
    while i > 0 and data[i - 1] != 0:
        i = data.find(b"WTBOX_ID=", i + 1)
    if i < 0:
        return None
    end = data.find(b"\0", i)
    return data[i + 9:end if end >= 0 else None].decode("utf-8", "replace") or None


def _pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def discover_box_ids(boxes_dir: Path | str) -> set[str]:
    """WTBOX_ID values of live processes that belong to boxes under `boxes_dir`.

    Several wtbox homes can share one machine (users, test suites): a process counts only
    when its WTBOX_BOX_DIR (every box process inherits the box env) or, failing that, its
    cwd lies under this home's boxes dir.
    """
    me = os.getpid()
    root = os.path.realpath(boxes_dir) + os.sep
    ids = set()
    for pid in _pids():
        if pid == me:
            continue
        box_id = _environ_id(pid)
        if not box_id:
            continue
        box_dir = _environ_var(pid, b"WTBOX_BOX_DIR=")
        if box_dir is None:
            try:
                box_dir = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue
        if os.path.realpath(box_dir).startswith(root) or box_dir.startswith(root):
            ids.add(box_id)
    return ids


def _environ_var(pid: int, key: bytes) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read()
    except OSError:
        return None
    for item in data.split(b"\0"):
        if item.startswith(key):
            return item[len(key):].decode("utf-8", "replace")
    return None


def find_box_processes(box_id: str, box_dir: Path | str | None) -> list[Any]:
    """psutil.Process objects that carry WTBOX_ID=<box_id> or whose cwd is inside box_dir."""

    root = os.path.realpath(box_dir) if box_dir else None
    protected = _protected()
    found = []
    for pid in _pids():
        if pid in protected:
            continue
        # WTBOX_ID alone could name a box of another home only by a 1-in-4-billion clash;
        # WTBOX_BOX_DIR rules even that out when the process carries it.
        mine = _environ_id(pid) == box_id and (
            box_dir is None or _environ_var(pid, b"WTBOX_BOX_DIR=") in (None, str(box_dir)))
        if not mine and root:
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                cwd = None
            if cwd and cwd.endswith(" (deleted)"):
                cwd = cwd[: -len(" (deleted)")]
            mine = bool(cwd) and (cwd == root or cwd.startswith(root + os.sep))
        if not mine:
            continue
        import psutil  # only once something matched: the import costs ~35 ms per rm

        try:
            p = psutil.Process(pid)
            if p.status() == psutil.STATUS_ZOMBIE:
                continue  # already dead; its parent (or init) reaps it
            found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def kill_staged(procs: Iterable[Any], timeout: float = KILL_WAIT) -> list[int]:
    """SIGTERM the processes (whole groups they lead), wait up to `timeout`, then SIGKILL. Returns pids killed."""
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
            try:
                # Signal a whole group only when its leader is one of ours: a stray that joined
                # someone else's group (a user's shell) must not take that group down with it.
                if pgid in pids and pgid != own_pgid:
                    os.killpg(pgid, sig)
                else:
                    os.kill(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    send(signal.SIGTERM, procs)
    alive = _wait_gone(procs, timeout)
    if alive:
        send(signal.SIGKILL, alive)
        _wait_gone(alive, timeout)
    return sorted(pids)


def _wait_gone(procs: list[Any], timeout: float) -> list[Any]:
    """Wait until the processes are dead; a zombie counts as dead (psutil.wait_procs would wait
    for its reaping, which a slow pid 1 may take seconds to do)."""
    import time

    deadline = time.monotonic() + timeout
    alive = list(procs)
    while alive and time.monotonic() < deadline:
        time.sleep(0.01)
        alive = [p for p in alive if pid_alive(p.pid)]
    return alive


def pid_alive(pid: int | None) -> bool:
    """True when the pid exists and is not a zombie."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X")


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []
