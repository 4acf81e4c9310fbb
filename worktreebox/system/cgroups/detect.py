"""Which cgroup backend this host offers a home, or why it offers none (one sentence for doctor)."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from worktreebox import settings
from worktreebox.system import procfs
from worktreebox.system.cgroups.base import CGROUP_FS, Cgroups, Leaf, home_key
from worktreebox.system.cgroups.v1 import CgroupsV1
from worktreebox.system.cgroups.v2 import CgroupsV2

_V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "freezer", "blkio")
_cache: dict[str, tuple[Cgroups | None, str | None]] = {}


def for_home(home: Path | str) -> Cgroups | None:
    """The box cgroups of this home, or None when this host cannot make them (see `unavailable`)."""
    return _detect(home)[0]


def unavailable(home: Path | str) -> str | None:
    """Why boxes run without cgroups here (one sentence for doctor), or None when they have them."""
    return _detect(home)[1]


def _detect(home: Path | str) -> tuple[Cgroups | None, str | None]:
    key = str(home)
    if key not in _cache:
        _cache[key] = detect(home_key(home))
    return _cache[key]


def detect(key: str, mountinfo: str | None = None) -> tuple[Cgroups | None, str | None]:
    """Pick the backend for this host: (backend, None) or (None, the reason there is none)."""
    if settings.CGROUPS.off():
        return None, "cgroups are turned off by WTBOX_CGROUPS=off"
    if mountinfo is None:
        try:
            mountinfo = procfs.mountinfo_text()
        except OSError as e:
            return None, f"{e.filename} cannot be read ({e.strerror})"
    v1: dict[str, Path] = {}
    for target, fstype, _source, options in procfs.parse_mountinfo(mountinfo):
        if fstype == "cgroup2" and Path(target) == CGROUP_FS:
            return _detect_v2(CGROUP_FS, key)
        if fstype == "cgroup":
            for opt in options.split(","):
                if opt in _V1_CONTROLLERS:
                    v1.setdefault(opt, Path(target))
    if not v1:
        return None, "no cgroup filesystem is mounted at /sys/fs/cgroup"
    writable = {c: m for c, m in v1.items() if os.access(m, os.W_OK)}
    if not writable:
        some = next(iter(v1.values()))
        return None, (f"the cgroup v1 hierarchies (e.g. {some}) are not writable by uid {os.geteuid()}; "
                      "run wtbox as root to get per-box limits")
    return CgroupsV1(writable, key), None


def _detect_v2(fs: Path, key: str) -> tuple[Cgroups | None, str | None]:
    if os.access(fs / "cgroup.procs", os.W_OK) and os.access(fs, os.W_OK):
        return CgroupsV2(fs, key, outside=fs), None
    own = procfs.unified_cgroup_path(procfs.own_cgroup())
    if own is None:
        return None, f"{procfs.SELF_CGROUP} shows no cgroup v2 path"
    parts = [p for p in own.strip("/").split("/") if p]
    ours = [i for i, p in enumerate(parts) if p.startswith("wtbox-")]
    if ours:  # a process of a box: start from where the box hangs
        parts = parts[:ours[0]]
    uid = os.geteuid()
    delegated = None
    for i in range(len(parts), 0, -1):  # the highest ancestor we own is the delegated subtree
        d = fs.joinpath(*parts[:i])
        try:
            owned = d.stat().st_uid == uid and os.access(d / "cgroup.procs", os.W_OK)
        except OSError:
            owned = False
        if not owned:
            break
        delegated = d
    if delegated is None:
        here = fs.joinpath(*parts) if parts else fs
        return None, (f"cgroup v2 gives uid {uid} no delegated subtree ({here} is not writable); run wtbox as "
                      "root, or under 'systemd-run --user --scope -p Delegate=yes'")
    return CgroupsV2(delegated, key, outside=delegated), None


def place(leaf: Leaf, pid: int) -> bool:
    """Move a running process into `leaf`; False when the host or the box has no cgroups."""
    backend = for_home(leaf.home)
    return backend is not None and backend.place(pid, leaf.box_id, leaf.name)


def placement(leaf: Leaf) -> Callable[[], None] | None:
    """The preexec hook that puts a new child into `leaf` (see Cgroups.placer); None when the
    host has no cgroups or the box has none (made before cgroups, or being removed)."""
    backend = for_home(leaf.home)
    return backend.placer(leaf.box_id, leaf.name) if backend is not None else None

