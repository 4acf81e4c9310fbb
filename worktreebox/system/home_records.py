"""The homes of this host, for what outlives a deleted home.

Box cgroups and host-wide port claims (leases.py) live on the host, not in a $WTBOX_HOME: a
user who deletes a home (a test's tmp dir, a reinstall) leaves them behind, and only another
home's gc can sweep them. A cgroup's name carries only an 8-hex key of its home
(cgroups.home_key), so a home notes key → path here when it makes a box cgroup:

    /var/lib/wtbox/homes/<home key>    the home's real path (a per-user directory when not root)

The shared directory follows the lease directory's rules (sticky and world-writable, made by
root); a record is one small file written whole, so a kill leaves it or not.
"""
from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from worktreebox.settings import user_state_dir
from worktreebox.system.fsutil import atomic_write

SHARED_DIR = Path("/var/lib/wtbox/homes")


def usable_shared(path: Path) -> bool:
    """`path` as a directory every user may add to, made if we may (root); usable only if it is a
    real directory that is sticky and writable for us (a world-writable one without the sticky
    bit would let any user delete anyone's records)."""
    try:
        if not path.exists() and os.geteuid() == 0:
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                path.mkdir()
                os.chmod(path, 0o1777)
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or not os.access(path, os.W_OK | os.X_OK):
        return False
    return bool(st.st_mode & stat.S_ISVTX) or (st.st_uid == os.geteuid() and not st.st_mode & 0o022)


def gone(home: str | Path) -> bool:
    """True when nothing of a home is left on disk (neither its registry nor its boxes)."""
    return not os.path.exists(os.path.join(home, "registry.sqlite3")) and not os.path.isdir(os.path.join(home, "boxes"))


def _dir() -> Path:
    return SHARED_DIR if usable_shared(SHARED_DIR) else Path(user_state_dir()) / "wtbox-homes"


def note(key: str, home: str | Path) -> None:
    """Record that `key` names `home` (cheap when already recorded: one stat)."""
    d = _dir()
    path = d / key
    real = os.path.realpath(home)
    with contextlib.suppress(OSError):
        if path.read_text() == real:
            return
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(path, real, mode=0o644)


def path_of(key: str) -> str | None:
    """The home a key was noted for, or None (never noted: made by an older wtbox, or another user's)."""
    for d in {_dir(), SHARED_DIR}:
        with contextlib.suppress(OSError):
            return (d / key).read_text() or None
    return None


def noted() -> dict[str, str]:
    """Every key → home noted on this host (the shared directory and this user's)."""
    out: dict[str, str] = {}
    for d in {_dir(), SHARED_DIR}:
        with contextlib.suppress(OSError):
            for e in os.scandir(d):
                if not e.name.startswith("."):
                    with contextlib.suppress(OSError):
                        out.setdefault(e.name, Path(e.path).read_text())
    return out


def forget(key: str) -> None:
    for d in {_dir(), SHARED_DIR}:
        with contextlib.suppress(OSError):
            (d / key).unlink()
