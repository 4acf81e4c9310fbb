"""Files that processes append to and one reader follows, in memory: where, woken how, freed how.

Where: a directory per box on tmpfs (/dev/shm: memory, never disk, gone at reboot), named like
the box's cgroup (`wtbox-<home key>-<box hex>`, so a pool box claimed under a new id keeps it).
Woken: dnotify on that directory, one watch for every file in it (a write wakes the reader;
nothing else does; `Watch` says why not inotify). Freed: what the reader consumed is punched out of the file
(fallocate PUNCH_HOLE), so a chatty writer does not grow memory; a new reader starts where
the holes end (SEEK_DATA), skipping the zeroed head of a partly punched page.
The syscall Python lacks (fallocate with a mode) is called through libc with ctypes, loaded on
first use.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import signal
from pathlib import Path
from typing import Any

SHM = Path("/dev/shm")
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x1, 0x2
PAGE = os.sysconf("SC_PAGE_SIZE")


@functools.cache
def _libc() -> Any:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    return libc


def box_dir(home_key: str, box_hex: str, fallback: Path) -> Path:
    """The box's directory of followed files: on tmpfs, or `fallback` where /dev/shm is missing."""
    base = SHM if SHM.is_dir() and os.access(SHM, os.W_OK) else fallback
    return base / f"wtbox-{home_key}-{box_hex}" if base == SHM else fallback


def dirs_of_home(home_key: str) -> dict[str, Path]:
    """Box hex → directory, for every box of this home that has one (gc)."""
    prefix = f"wtbox-{home_key}-"
    try:
        return {e.name[len(prefix):]: Path(e.path) for e in os.scandir(SHM) if e.name.startswith(prefix)}
    except OSError:
        return {}


class Watch:
    """Wakes a reader when a file in `directory` is written: dnotify (fcntl F_NOTIFY, DN_MODIFY),
    whose signal (SIGIO) a handler turns into a byte on this watch's pipe; select on `fileno()`.
    Not inotify: the kernel gives each user 128 inotify instances (fs.inotify.max_user_instances)
    and every box's supervisor runs as the same user, so the 129th box's could not start; dnotify
    has no such limit. The handler is installed from the main thread (Python runs it there)."""

    def __init__(self, directory: Path) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        _WAKE[self.dir_fd] = self.w
        if signal.getsignal(signal.SIGIO) is not _on_sigio:
            signal.signal(signal.SIGIO, _on_sigio)  # before the first event: SIGIO's default ends the process
        fcntl.fcntl(self.dir_fd, fcntl.F_NOTIFY, fcntl.DN_MODIFY | fcntl.DN_MULTISHOT)

    def fileno(self) -> int:
        return self.r

    def drain(self) -> None:
        """Forget the wake-ups so far (the reader then looks at every file)."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self.r, 4096):
                pass

    def close(self) -> None:
        _WAKE.pop(self.dir_fd, None)
        for fd in (self.dir_fd, self.r, self.w):
            os.close(fd)


_WAKE: dict[int, int] = {}  # watched directory fd → the write end of its watch's pipe


def _on_sigio(signum: int, frame: Any) -> None:
    for w in list(_WAKE.values()):  # dnotify's SIGIO does not say which directory: wake them all
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or just closed
            os.write(w, b"\0")


def release(fd: int, upto: int) -> None:
    """Give back the memory of what was consumed (bytes below `upto`): whole pages are freed, the
    consumed part of the last one is zeroed (so a new reader does not read it twice)."""
    if upto > 0:
        _libc().fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, upto)  # fails harmlessly on disk


def start_of_data(fd: int) -> int:
    """Where an earlier reader stopped: the first byte past the punched holes (and their zeroed tail)."""
    try:
        pos = os.lseek(fd, 0, os.SEEK_DATA)
    except OSError:  # ENXIO: nothing but holes, or no data at all
        return os.fstat(fd).st_size
    head = os.pread(fd, PAGE, pos)
    return pos + len(head) - len(head.lstrip(b"\0"))


def _errno() -> int:
    import ctypes

    return ctypes.get_errno()
