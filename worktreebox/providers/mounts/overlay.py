"""Kernel overlayfs: the box sees the shared tree, its writes land in its own upper dir (root only)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from worktreebox.providers.mounts.base import MountError, MountProvider, mounts_under, sys_mount, unmount

# Characters overlayfs' option parser treats specially in lowerdir/upperdir/workdir.
_SPECIAL = (",", ":", "\\")


class Overlay(MountProvider):
    name = "overlay"

    def options(self, lower: Path, upper: Path, work: Path, volatile: bool = True) -> str:
        for p in (lower, upper, work):
            if any(ch in str(p) for ch in _SPECIAL):
                raise MountError(f"overlayfs cannot take the path {p} (it contains ',', ':' or '\\\\').")
        # volatile: a box is disposable, so its upper dir needs no syncing; without it every
        # unmount syncs the whole upper file system, which costs seconds on a busy disk.
        return f"lowerdir={lower},upperdir={upper},workdir={work}" + (",volatile" if volatile else "")

    def attach(self, lower: Path, target: Path, scratch: Path) -> None:
        upper, work = prepare_dirs(target, scratch)
        try:
            sys_mount("overlay", target, "overlay", self.options(lower, upper, work))
        except MountError:
            # kernels before 5.10 do not know `volatile`
            sys_mount("overlay", target, "overlay", self.options(lower, upper, work, volatile=False))

    def probe(self, scratch: Path) -> str | None:
        if os.geteuid() != 0:
            return "wtbox is not running as root (overlayfs mounts need CAP_SYS_ADMIN)"
        return probe_cow(self, scratch)


def prepare_dirs(target: Path, scratch: Path) -> tuple[Path, Path]:
    """The upper and work dirs of an overlay (kernel or FUSE) in `scratch`, and the mount point.
    The work dir is overlayfs' own scratch (and marks a volatile mount that a reboot cut short):
    a fresh one on every mount lets a box be mounted again after a reboot."""
    upper, work = scratch / "upper", scratch / "work"
    upper.mkdir(parents=True, exist_ok=True)
    if work.exists():
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    target.mkdir(parents=True, exist_ok=True)
    return upper, work


def probe_cow(provider: MountProvider, scratch: Path) -> str | None:
    """Mount a one-file tree, write through the view, check the write stayed out of the tree."""
    lower, target = scratch / "lower", scratch / "target"
    try:
        lower.mkdir(parents=True)
        (lower / "file").write_text("lower\n")
        provider.attach(lower, target, scratch / "box")
        try:
            if (target / "file").read_text() != "lower\n":
                return "the mounted view does not show the tree"
            (target / "file").write_text("box\n")
            if (lower / "file").read_text() != "lower\n":
                return "a write through the view reached the shared tree"
        finally:
            for m in mounts_under(target, include_root=True):
                unmount(m)
        return None
    except (OSError, MountError) as e:
        return str(e).rstrip(".")
