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

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from worktreebox.system import cgroups, procfs
from worktreebox.system.procs.identity import caller_and_ancestors, pid_alive

# ---------------------------------------------------------------- a box's processes


def discover_box_ids(boxes_dir: Path | str) -> set[str]:
    """WTBOX_ID values of live processes that belong to boxes under `boxes_dir`.

    Several wtbox homes can share one machine (users, test suites): a process counts only
    when its WTBOX_BOX_DIR (every box process inherits the box env) or, failing that, its
    cwd lies under this home's boxes dir.
    """
    me = os.getpid()
    root = os.path.realpath(boxes_dir) + os.sep
    ids = set()
    for pid in procfs.pids():
        env = (procfs.environ(pid) or b"") if pid != me else b""
        box_id = procfs.environ_value(env, "WTBOX_ID")
        if not box_id:
            continue
        box_dir = procfs.environ_value(env, "WTBOX_BOX_DIR") or procfs.cwd(pid)
        if box_dir and (os.path.realpath(box_dir).startswith(root) or box_dir.startswith(root)):
            ids.add(box_id)
    return ids


def find_box_processes(box_id: str, box_dir: Path | str | None) -> list[Any]:
    """psutil.Process objects that carry WTBOX_ID=<box_id> or whose cwd is inside box_dir."""
    root = os.path.realpath(box_dir) if box_dir else None
    protected = caller_and_ancestors()
    found = []
    for pid in procfs.pids():
        if pid not in protected and _belongs(pid, box_id, box_dir, root):
            found += _live([pid])
    return found


def _belongs(pid: int, box_id: str, box_dir: Path | str | None, root: str | None) -> bool:
    env = procfs.environ(pid) or b""
    # WTBOX_ID alone could name a box of another home only by a 1-in-4-billion clash;
    # WTBOX_BOX_DIR rules even that out when the process carries it.
    if procfs.environ_value(env, "WTBOX_ID") == box_id and (
            box_dir is None or procfs.environ_value(env, "WTBOX_BOX_DIR") in (None, str(box_dir))):
        return True
    cwd = procfs.cwd(pid) if root else None
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
    import psutil

    names = set(names)
    found = []
    for p in psutil.process_iter(["name"]):
        try:
            if p.info["name"] not in names:
                continue
            env = p.environ()
            if env.get("WTBOX_ID") != box_id:
                continue
            if box_dir is not None and env.get("WTBOX_BOX_DIR", str(box_dir)) != str(box_dir):
                continue
            found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


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
    import psutil

    names = set(names)
    root = f"{under}/"
    ids = set()
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            if p.info["name"] not in names:
                continue
            args = p.info["cmdline"] or []
            mine = any(a.startswith(root) or a.partition("=")[2].startswith(root) for a in args)
            box_id = p.environ().get("WTBOX_ID")
            if mine and box_id:
                ids.add(box_id)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return ids


# ---------------------------------------------------------------- ports and their holders

def listeners(port: int) -> list[int]:
    """Pids listening on TCP `port` (any address); 0 stands for a process we may not see."""
    import psutil

    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return []
    return sorted({c.pid or 0 for c in conns
                   if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port})


def tree_listens_on(pid: int, port: int) -> bool:
    """Whether `pid` or one of its descendants listens on TCP `port`."""
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    for p in tree:
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in p.net_connections(kind="tcp")):
                return True
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return False


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
