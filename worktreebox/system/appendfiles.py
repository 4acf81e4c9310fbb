"""Files that processes append to and one reader follows, in memory: where, woken how, freed how.

Where: a directory per box on tmpfs (/dev/shm: memory, never disk, gone at reboot), named like
the box's cgroup (`wtbox-<home key>-<box hex>`, so a pool box claimed under a new id keeps it).
Woken: inotify IN_MODIFY on that directory, one watch for every file in it (a write wakes the
reader; nothing else does). Freed: what the reader consumed is punched out of the file
(fallocate PUNCH_HOLE), so a chatty writer does not grow memory; a new reader starts where
the holes end (SEEK_DATA), skipping the zeroed head of a partly punched page.
The three syscalls Python lacks (inotify_init1, inotify_add_watch, fallocate with a mode) are
called through libc with ctypes, loaded on first use.
"""
from __future__ import annotations

import functools
import os
import struct
from pathlib import Path
from typing import Any

SHM = Path("/dev/shm")
IN_MODIFY, IN_CLOSE_WRITE = 0x2, 0x8
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x1, 0x2
PAGE = os.sysconf("SC_PAGE_SIZE")
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)


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


def watch(directory: Path) -> int:
    """An inotify fd (non-blocking) that becomes readable when a file in `directory` is written."""
    libc = _libc()
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        raise OSError(_errno(), "inotify_init1 failed")
    if libc.inotify_add_watch(fd, os.fsencode(directory), IN_MODIFY | IN_CLOSE_WRITE) < 0:
        err = _errno()
        os.close(fd)
        raise OSError(err, f"inotify_add_watch {directory} failed")
    return fd


def changed_names(fd: int) -> set[str]:
    """Drain the watch: the names of the files written since the last call."""
    names: set[str] = set()
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return names
        i = 0
        while i + _EVENT.size <= len(data):
            _wd, _mask, _cookie, n = _EVENT.unpack_from(data, i)
            names.add(data[i + _EVENT.size:i + _EVENT.size + n].rstrip(b"\0").decode(errors="replace"))
            i += _EVENT.size + n


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
