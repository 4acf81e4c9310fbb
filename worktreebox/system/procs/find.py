"""Finding processes: a box's, detached helpers by name, the holders of a port.

Every process a box starts sits in the box's cgroup (where the host has cgroups), carries
WTBOX_ID=<id> in its environment (inherited by children and double-forked daemons alike), and
most run with a cwd inside the box, so given an id the kernel can tell exactly which processes
belong to it. The cgroup is exact (a daemon that cleared its environment and left the box dir
is still in it); env and cwd are the second net. The environment is read straight from the
kernel (procfs): much faster than psutil for a scan of every process, which is imported only
once something matched (~35 ms).
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from worktreebox.system import cgroups, procfs
from worktreebox.system.procs.identity import caller_and_ancestors, pid_alive

# ---------------------------------------------------------------- one walk of /proc for many questions

class Seen(NamedTuple):
    """What the scans below need of one process: its box (WTBOX_ID, WTBOX_BOX_DIR), its cwd, and
    for a box's process its name (comm: at most 15 characters)."""

    pid: int
    box_id: str | None
    box_dir: str | None
    cwd: str | None
    name: str | None


class _Walk:
    """The walk `one_walk` shares: made on first use inside the outermost context, dropped at its end."""

    def __init__(self) -> None:
        self.seen: list[Seen] | None = None
        self.depth = 0
        self.lock = threading.Lock()


_WALK = _Walk()


@contextlib.contextmanager
def one_walk() -> Iterator[None]:
    """Within it the scans below share one walk of /proc, made on first use, instead of one each:
    `rm --all` of 300 boxes made two walks of ~1,500 processes per box (issue 27). For work over
    many boxes whose processes do not start meanwhile (a box's cgroup kill stays exact)."""
    with _WALK.lock:
        _WALK.depth += 1
    try:
        yield
    finally:
        with _WALK.lock:
            _WALK.depth -= 1
            if not _WALK.depth:
                _WALK.seen = None


def _processes() -> list[Seen]:
    with _WALK.lock:
        if not _WALK.depth:
            return _scan()
        if _WALK.seen is None:
            _WALK.seen = _scan()
        return _WALK.seen


def _scan() -> list[Seen]:
    me = os.getpid()
    out = []
    for pid in procfs.pids():
        env = (procfs.environ(pid) or b"") if pid != me else b""
        box_id = procfs.environ_value(env, "WTBOX_ID")
        out.append(Seen(pid, box_id, procfs.environ_value(env, "WTBOX_BOX_DIR"), procfs.cwd(pid),
                        procfs.comm(pid) if box_id else None))
    return out


def _named(seen: Seen, names: set[str]) -> bool:
    return seen.name is not None and any(seen.name == n[:15] for n in names)


# ---------------------------------------------------------------- a box's processes


def discover_box_ids(boxes_dir: Path | str) -> set[str]:
    """WTBOX_ID values of live processes that belong to boxes under `boxes_dir`.

    Several wtbox homes can share one machine (users, test suites): a process counts only
    when its WTBOX_BOX_DIR (every box process inherits the box env) or, failing that, its
    cwd lies under this home's boxes dir.
    """
    root = os.path.realpath(boxes_dir) + os.sep
    ids = set()
    for seen in _processes():
        box_dir = seen.box_dir or seen.cwd
        if seen.box_id and box_dir and (os.path.realpath(box_dir).startswith(root) or box_dir.startswith(root)):
            ids.add(seen.box_id)
    return ids


def find_box_processes(box_id: str, box_dir: Path | str | None) -> list[Any]:
    """psutil.Process objects that carry WTBOX_ID=<box_id> or whose cwd is inside box_dir."""
    root = os.path.realpath(box_dir) if box_dir else None
    protected = caller_and_ancestors()
    found = []
    for seen in _processes():
        if seen.pid not in protected and _belongs(seen, box_id, box_dir, root):
            found += _live([seen.pid])
    return found


def _belongs(seen: Seen, box_id: str, box_dir: Path | str | None, root: str | None) -> bool:
    # WTBOX_ID alone could name a box of another home only by a 1-in-4-billion clash;
    # WTBOX_BOX_DIR rules even that out when the process carries it.
    if seen.box_id == box_id and (box_dir is None or seen.box_dir in (None, str(box_dir))):
        return True
    cwd = seen.cwd if root else None
    return cwd is not None and (cwd == root or cwd.startswith(f"{root}{os.sep}"))


def _live(pids: Iterable[int]) -> list[Any]:
    """psutil objects of the pids that still run (zombies are dead: their parent reaps them)."""
    import psutil

    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            continue
    return out


def cgroup_pids(home: Path | str, box_id: str, leaf: str | None = None) -> set[int]:
    """The live processes in the box's cgroup (or one leaf); empty without cgroups."""
    backend = cgroups.for_home(home)
    return backend.pids(box_id, leaf) if backend is not None else set()


def find_mentioning(text: str) -> list[Any]:
    """Live processes (psutil) whose command line contains `text`, e.g. a profile dir: found even
    when their environment was cleared (Chromium's zygote clears it for what it forks)."""
    needle = text.encode()
    me = os.getpid()
    matched = [pid for pid in procfs.pids()
               if pid != me and needle in (procfs.cmdline_bytes(pid) or b"") and pid_alive(pid)]
    return _live(matched) if matched else []  # psutil is imported only once something matched


# ---------------------------------------------------------------- detached helpers by name
# The metrics store and Vector run detached (reparented to init), found again by their
# name plus the WTBOX_ID in their environment, or by the pid file written at start.

def pids_named(name: str) -> list[int]:
    """Pids of live processes whose kernel name is `name`."""
    return [pid for pid in procfs.pids() if procfs.comm(pid) == name]


def find_named(box_id: str, names: Iterable[str], box_dir: Path | None = None) -> list[Any]:
    """Live processes (psutil) with one of `names` whose environment carries WTBOX_ID=<box_id>
    (and, when given, WTBOX_BOX_DIR=<box_dir>, so another home's box is never touched)."""
    names = set(names)
    pids = [s.pid for s in _processes() if s.box_id == box_id and _named(s, names)
            and (box_dir is None or (s.box_dir or str(box_dir)) == str(box_dir))]
    return _live(pids) if pids else []


def from_pid_file(pid_file: Path, box_id: str, names: Iterable[str] | None) -> Any | None:
    """The live process (psutil) a pid file names, if it is still ours (guards against pid reuse);
    `names` None: whatever its name (a binary the user may swap, such as Chromium)."""
    import psutil

    try:
        pid = int(pid_file.read_text().strip())
        p = psutil.Process(pid)
        if (names is None or p.name() in set(names)) and p.environ().get("WTBOX_ID") == box_id \
                and p.status() != psutil.STATUS_ZOMBIE:
            return p
    except (OSError, ValueError, psutil.Error):
        pass
    return None


def box_ids_elsewhere(names: Iterable[str], home_boxes: Path) -> set[str]:
    """Box ids (WTBOX_ID) of live processes with one of `names` whose WTBOX_BOX_DIR is not under
    `home_boxes`: boxes of another home (a sandboxed box's holder runs as long as the box lives)."""
    import psutil

    names, root = set(names), f"{home_boxes}/"
    ids = set()
    for p in psutil.process_iter(["name"]):
        try:
            if p.info["name"] not in names:
                continue
            env = p.environ()
            if env.get("WTBOX_ID") and not env.get("WTBOX_BOX_DIR", root).startswith(root):
                ids.add(env["WTBOX_ID"])
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return ids


def named_box_ids(names: Iterable[str], under: Path) -> set[str]:
    """Box ids (WTBOX_ID) of live processes with one of `names` whose command line names a path
    under `under` (a home's boxes dir), as an argument or a `-flag=PATH` value."""
    names = set(names)
    root = f"{under}/"
    ids = set()
    for seen in _processes():
        if seen.box_id and _named(seen, names):
            args = procfs.cmdline(seen.pid)
            if any(a.startswith(root) or a.partition("=")[2].startswith(root) for a in args):
                ids.add(seen.box_id)
    return ids


# ---------------------------------------------------------------- ports and their holders

def listeners(port: int) -> list[int]:
    """Pids listening on TCP `port` (any address) in our network namespace; 0 stands for a
    socket whose holder we may not see."""
    inodes = procfs.listening_inodes("self", port)
    if not inodes:
        return []
    holders: dict[int, int] = {}
    for pid in procfs.pids():
        for inode in procfs.socket_inodes(pid) & inodes:
            holders.setdefault(inode, pid)
    return sorted({holders.get(inode, 0) for inode in inodes})


def tree_listens_on(pid: int, port: int) -> bool:
    """Whether `pid` or one of its descendants listens on TCP `port` (in `pid`'s network
    namespace). From /proc directly: psutil would stay loaded in every box's supervisor, whose
    readiness checks ask this (4 MB of its RSS)."""
    inodes = procfs.listening_inodes(pid, port)
    return bool(inodes) and any(procfs.socket_inodes(p) & inodes for p in procfs.descendants({pid}))


def memory_of(processes: Iterable[Any]) -> dict[str, int]:
    """RSS, PSS and USS in bytes summed over psutil processes. RSS counts a shared binary's pages
    once per process; USS (pages no other process has) is what one more such process tree adds."""
    import psutil

    rss = pss = uss = 0
    for p in processes:
        try:
            m = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        rss += m.rss
        pss += getattr(m, "pss", 0)
        uss += getattr(m, "uss", 0)
    return {"rss_bytes": rss, "pss_bytes": pss, "uss_bytes": uss}
