"""A box's own changes to its files, as a snapshot keeps them: the upper layers of its copy-on-write
views (the worktree's and each dependency layer's), git's index of the worktree, and its branch tip.

What is shared (the commit's pristine tree, the dependency layers) is not copied: a snapshot costs
the disk of what the box changed. Copies are `cp -a` (modes, times, and the overlay's own marks:
whiteout devices for deletions, `trusted.overlay.*` xattrs for opaque directories), reflinked where
the file system can. An overlay's upper layer must not change under a mounted view, so a copy *into*
a live box unmounts its views first and mounts them again (`put_back`); a fork seeds its upper
layers before its views are mounted (providers/mounts/base.seed_upper).

Boxes whose worktree is a plain checkout (no copy-on-write view) have no upper layer to copy:
snapshots refuse them with one sentence (`check`).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from worktreebox.errors import WtboxError
from worktreebox.providers.mounts.base import copy_tree
from worktreebox.system import git

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.context import HostContext

INDEX = "index"


def check(box: Box) -> None:
    """Refuse a box whose changes cannot be told from its tree (plain checkout or reflink copies)."""
    from worktreebox.providers import mounts

    name = (box.data.get("worktree") or {}).get("mount")
    provider = mounts.get(name) if name in mounts.PROVIDERS else None
    if provider is None or not provider.mounts or not (box.data.get("worktree") or {}).get("tree"):
        raise WtboxError(f"{box.id} has a plain checkout ({name or 'no'} mount provider), not a copy-on-write "
                         "view, so its own changes cannot be told from the tree; snapshots and forks need the "
                         "overlay or fuse-overlayfs provider (see 'wtbox doctor').")


def uppers(box: Box) -> dict[str, Path]:
    """Each upper layer of the box by its place under the box dir ("upper", "deps/0.0/upper", ...)."""
    out = {"upper": box.dir / "upper"}
    for layer in sorted((box.dir / "deps").glob("*/upper")):
        out[str(layer.relative_to(box.dir))] = layer
    return out


def admin_dir(box: Box) -> Path:
    from worktreebox.resources.worktree import _admin_dir

    admin = _admin_dir(box)
    if admin is None:
        raise WtboxError(f"The git worktree of {box.id} is broken (no admin dir); remove the box.")
    return admin


def branch_tip(box: Box) -> str:
    """The box branch's commit, read from the repository's refs (~40 ms less than `git rev-parse`)."""
    from worktreebox.resources.worktree import read_branch_tip

    return read_branch_tip(admin_dir(box), box.branch) or \
        git.out(box.repo, "rev-parse", "--verify", f"refs/heads/{box.branch}^{{commit}}")


def save(box: Box, dest: Path) -> str:
    """Copy the box's upper layers and index into `dest`; the branch tip (call with the box frozen)."""
    for rel, src in uppers(box).items():
        copy_tree(src, dest / rel)
    shutil.copyfile(admin_dir(box) / INDEX, dest / INDEX)
    return branch_tip(box)


def pristine_copy(host: HostContext, box: Box, saved: Path, tip: str) -> bool:
    """The saved copy (taken with the box frozen) holds no change of the commit's tree: its worktree
    upper layer only mount points, its dependency layers' empty, its index the tree's and its tip the
    commit. A fork of it may then be a pooled box whose services run on those very files. Judged on
    the copy, not the live box, which runs on after the pause."""
    from worktreebox.layers import trees
    from worktreebox.resources.worktree import only_mount_points

    sha = (box.data.get("worktree") or {}).get("tree")
    if not sha or sha != box.data.get("base_sha") or tip != sha or not only_mount_points(saved / "upper"):
        return False
    if any(any(p.iterdir()) for p in saved.glob("deps/*/upper") if p.is_dir()):
        return False
    try:
        return (saved / INDEX).read_bytes() == (trees.store(host.home).path(sha) / INDEX).read_bytes()
    except OSError:
        return False


def write_git_state(box: Box, src: Path, tip: str) -> None:
    """The snapshot's index as the worktree's, and the box's branch at the snapshot's tip."""
    shutil.copyfile(src / INDEX, admin_dir(box) / INDEX)
    git.git(box.repo, "update-ref", f"refs/heads/{box.branch}", tip)


def same(box: Box, src: Path, tip: str) -> bool:
    """True when the box's files, index and branch are exactly the snapshot's (a restore of data
    alone then leaves its running services alone). Compares names, types, sizes and times."""
    try:
        if branch_tip(box) != tip or (admin_dir(box) / INDEX).read_bytes() != (src / INDEX).read_bytes():
            return False
    except (OSError, WtboxError):
        return False
    now = uppers(box)
    then = {str(p.relative_to(src)): p for p in [src / "upper", *sorted(src.glob("deps/*/upper"))]
            if p.is_dir()}
    return set(now) == set(then) and all(_listing(now[k]) == _listing(then[k]) for k in now)


def put_back(host: HostContext, box: Box, src: Path, tip: str) -> None:
    """Replace the box's upper layers with the snapshot's and mount its views again. The services
    must be stopped: whatever still has a file open in the old view keeps the old one (lazy unmount).
    Idempotent: a restore killed half-way is finished by running it again."""
    from worktreebox.providers.mounts.base import unmount_all
    from worktreebox.resources.worktree import move_to_trash

    unmount_all(box.dir)
    for path in uppers(box).values():
        if not move_to_trash(host, path, box.id):
            shutil.rmtree(path, ignore_errors=True)
    for p in [src / "upper", *sorted(src.glob("deps/*/upper"))]:
        copy_tree(p, box.dir / p.relative_to(src))
    from worktreebox.resources.deps import Deps
    from worktreebox.resources.worktree import Worktree

    Worktree().revive(host, box)  # the worktree view, then the dependency layers inside it
    Deps().revive(host, box)
    write_git_state(box, src, tip)


def disk_bytes(path: Path) -> int:
    from worktreebox.system.fsutil import own_bytes

    return own_bytes(path)


def _listing(root: Path) -> set[tuple[str, int, int, int]]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            size = 0 if name in dirnames else st.st_size
            out.add((os.path.relpath(p, root), st.st_mode, size, 0 if name in dirnames else st.st_mtime_ns))
    return out
