"""What every mount provider shares: the interface, the kernel's mount table, and unmounting.

A provider makes `target` a copy-on-write view of a read-only `lower` directory whose writes
land in `scratch/upper` (overlayfs, fuse-overlayfs), or a cheap private copy of it (reflink),
or a plain copy (the fallback). Unmounting does not depend on the provider that mounted:
whatever the kernel lists under a box's directory is taken down, deepest first, so a box
whose registry row never recorded its mounts (kill -9 between mount and save) is still
cleaned exactly.
"""
from __future__ import annotations

import dataclasses
import errno
import functools
import os
import shutil
import subprocess
from pathlib import Path

from worktreebox.errors import WtboxError
from worktreebox.system.fsutil import own_bytes  # noqa: F401 (where mount code has always found it)

MNT_DETACH = 2
MS_MOVE, MS_BIND, MS_REC, MS_SHARED = 8192, 4096, 16384, 1 << 20


class MountError(WtboxError):
    """A mount or unmount failed; the message says which and why (`errno`: the kernel's, when it said one)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class MountProvider:
    """One way of giving a box a private, writable view of a shared read-only tree."""

    name = "provider"
    # False: the view is a private copy, nothing to unmount (reflink, copy).
    mounts = True
    # False: the box's worktree is a plain `git worktree add`, without a pristine tree.
    uses_tree = True
    # True: files in the view keep the tree's inode numbers and times, so the tree's git index
    # is valid as is (False: git must refresh it once).
    same_inodes = True

    @classmethod
    def check(cls) -> dict | None:
        """`wtbox doctor`'s line for what this provider needs installed (None: nothing; the worktree
        resource reports which provider is in use and why)."""
        return None

    def probe(self, scratch: Path) -> str | None:
        """None when this provider works with directories under `scratch`, else why not (one phrase)."""
        raise NotImplementedError

    def attach(self, lower: Path, target: Path, scratch: Path) -> None:
        """Make the (empty) directory `target` a writable view of `lower`; writes go to `scratch`."""
        raise NotImplementedError

    def own_changes(self, target: Path, scratch: Path) -> Path:
        """Where the view's own changes are on disk (what `status` counts as the box's disk)."""
        return scratch / "upper" if self.mounts else target


# ---------------------------------------------------------------- the kernel's mount table

@dataclasses.dataclass
class Mount:
    target: str
    fstype: str
    source: str
    options: str  # per-superblock options (overlay: lowerdir=...,upperdir=...)


def mount_table() -> list[Mount]:
    """Every mount this process sees, in mount order."""
    from worktreebox.system import procfs

    return [Mount(*fields) for fields in procfs.mountinfo()]


def mounts_under(root: Path | str, table: list[Mount] | None = None, *, include_root: bool = False) -> list[Mount]:
    """Mounts below `root` (and on it, with include_root), deepest first (the order to take them down in)."""
    root = os.path.abspath(root)
    prefix = root.rstrip("/") + "/"
    found = [m for m in (mount_table() if table is None else table)
             if m.target.startswith(prefix) or (include_root and m.target == root)]
    return sorted(found, key=lambda m: m.target.count("/"), reverse=True)


def is_mountpoint(path: Path | str) -> bool:
    path = os.path.abspath(path)
    return any(m.target == path for m in mount_table())


# ---------------------------------------------------------------- mount(2) / umount2(2)

@functools.cache
def _libc():
    import ctypes  # only when mounting: the import costs more than most commands' work

    # the process's own symbols include libc's (ctypes.util.find_library would run ldconfig)
    return ctypes.CDLL(None, use_errno=True)


def sys_mount(source: str, target: Path, fstype: str, options: str, flags: int = 0) -> None:
    """mount(2) directly: a `mount` process costs more than the mount itself."""
    import ctypes

    rc = _libc().mount(source.encode(), str(target).encode(), fstype.encode(), flags, options.encode())
    if rc != 0:
        e = ctypes.get_errno()
        raise MountError(f"mounting {fstype or 'a bind'} on {target} failed: {os.strerror(e)}.", e)


def move_mount(source: Path, target: Path) -> bool:
    """Move the mount on `source` (with everything mounted under it) to the new directory `target`, which
    rename(2) refuses to do for a mount point; True when `source` is gone.

    Under a shared mount (a sandboxed home's boxes/) the kernel refuses MS_MOVE (EINVAL): there the
    tree is bound at `target` as well, recursively (the box's view and layers come along as twins of
    the same mounts), and `source` stays (False): taking it down would take the view's twin down in
    the box's own sandbox too (an unmount reaches every copy of a shared mount's children), and the
    processes that run under the old name keep their paths."""
    target.mkdir(mode=0o700)
    try:
        sys_mount(str(source), target, "", "", MS_MOVE)
    except MountError as moved:
        try:
            if moved.errno != errno.EINVAL:
                raise
            sys_mount(str(source), target, "", "", MS_BIND | MS_REC)
        except MountError:
            target.rmdir()
            raise
        return False
    source.rmdir()
    return True


def make_shared(path: Path, *, bind: bool) -> None:
    """Make `path` a shared mount (with `bind`: first a bind of itself, so that it is a mount):
    mounts made under it later reach the mount namespaces that copied it, and so do unmounts."""
    if bind:
        sys_mount(str(path), path, "", "", MS_BIND)
    sys_mount("none", path, "", "", MS_SHARED)


def _umount2(target: str, flags: int) -> int:
    import ctypes

    rc = _libc().umount2(target.encode(), flags)
    return 0 if rc == 0 else ctypes.get_errno()


def unmount(m: Mount) -> None:
    """Take one mount down: normally, or through fusermount when we may not (unprivileged fuse),
    or lazily when something still holds it (a shell whose cwd is inside)."""
    err = _umount2(m.target, 0)
    if err in (0, errno.EINVAL, errno.ENOENT):
        return  # EINVAL: not a mount point (any more)
    if err == errno.EPERM and m.fstype.startswith("fuse"):
        for tool in ("fusermount3", "fusermount"):
            if shutil.which(tool):
                proc = subprocess.run([tool, "-u", m.target], capture_output=True, text=True)
                if proc.returncode == 0:
                    return
                if "busy" in proc.stderr.lower():
                    subprocess.run([tool, "-uz", m.target], capture_output=True)
                    return
        raise MountError(f"cannot unmount {m.target}: fusermount failed.")
    if err == errno.EBUSY:
        # Still in use after the box's processes were stopped (someone's shell is in there):
        # detach it now; the kernel frees it when the last user leaves.
        err = _umount2(m.target, MNT_DETACH)
        if err in (0, errno.EINVAL):
            return
    raise MountError(f"cannot unmount {m.target}: {os.strerror(err)}.")


def unmount_all(root: Path | str, *, include_root: bool = False) -> list[str]:
    """Unmount everything below `root` (and on it, with include_root), deepest first; the targets taken down."""
    done = []
    for m in mounts_under(root, include_root=include_root):
        unmount(m)
        done.append(m.target)
    return done


def copy_tree(src: Path, dest: Path) -> None:
    """`cp -a src dest` (dest must not exist), reflinked where the file system can: modes, times and
    an overlay's own marks (whiteout devices for deletions, `trusted.overlay.*` xattrs) kept."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["cp", "-a", "--reflink=auto", str(src), str(dest)], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise MountError(f"copying {src} to {dest} failed: {lines[-1] if lines else proc.returncode}.")


def seed_upper(src: Path, scratch: Path) -> None:
    """Before a view is mounted in `scratch`: its upper layer starts as a copy of `src` (a snapshot's
    upper layer: a fork's view shows what the snapshotted box saw). Nothing when `src` is absent."""
    if src.is_dir():
        copy_tree(src, scratch / "upper")


def clean_env() -> dict[str, str]:
    """The environment for a mount helper daemon: not a box process (no WTBOX_* ids), so tearing
    down a box's processes never takes its file system with it."""
    return {k: v for k, v in os.environ.items() if not k.startswith("WTBOX_")}
