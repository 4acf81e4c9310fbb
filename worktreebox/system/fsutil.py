"""Files written whole or not at all, and the one file lock.

Every state file wtbox keeps (env files, supervisor state, credentials, cluster state)
goes through `atomic_write`, and every cross-process critical section through
`file_lock`, so a `kill -9` at any instant leaves either the old or the new file and
never a lock that outlives its holder (flock dies with the process).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from worktreebox.errors import WtboxError


class LockBusy(WtboxError):
    """The lock is held by another process and the wait ran out."""


def atomic_write(path: str | Path, data: str | bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` through a temporary file and a rename; the file is created with `mode`."""
    path = Path(path)
    # pid and thread: threads of one process (fan-out's `new`s) may write the same file at once
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, mode)  # the umask may have narrowed it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def file_lock(path: str | Path, *, timeout: float | None = None, what: str = "the lock",
              mode: int = 0o600) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created with `mode` if missing: 0o666 for a lock that
    several users share). timeout None waits forever, 0 tries once; when it runs out, LockBusy
    names `what`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, mode)
    except PermissionError:  # another user's lock file: reading is enough for flock
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    if mode & 0o066:
        with contextlib.suppress(OSError):
            os.fchmod(fd, mode)  # the umask narrowed it; only its owner can widen it
    try:
        if timeout is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LockBusy(f"{what} is held by another process ({path}); try again shortly.") from None
                    time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def own_bytes(path: Path | str) -> int:
    """Disk blocks used under `path` without crossing into mounts (a box's shared views are not its own)."""
    try:
        dev = os.lstat(path).st_dev
    except OSError:
        return 0
    total = 0
    for root, dirs, files in os.walk(path):
        keep = []
        for d in dirs:
            try:
                if os.lstat(os.path.join(root, d)).st_dev == dev:
                    keep.append(d)
            except OSError:
                pass
        dirs[:] = keep
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total
