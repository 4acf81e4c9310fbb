"""Reading and writing cgroupfs files, and walking and removing cgroup directories."""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path


def members(d: Path) -> set[int]:
    """pids in d and every cgroup below it (zombies are not listed: they cannot run)."""
    out: set[int] = set()
    for dirpath, _dirs, _files in os.walk(d):
        for line in read(Path(dirpath) / "cgroup.procs").split():
            out.add(int(line))
    return out


def rmtree(d: Path, timeout: float = 2.0) -> None:
    """rmdir d and its children, deepest first (cgroupfs dirs hold only control files)."""
    if not d.is_dir():
        return
    for dirpath, _dirs, _files in os.walk(d, topdown=False):
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.rmdir(dirpath)
                break
            except FileNotFoundError:
                break
            except OSError:  # EBUSY while the last killed task is still exiting
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)


def sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def read(path: Path) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def write_if(path: Path, value: int) -> bool:
    """Write a limit when the controller offers the file; False when it does not."""
    try:
        fd = os.open(path, os.O_WRONLY)  # never O_CREAT: cgroupfs refuses that with EACCES
    except FileNotFoundError:
        return False
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)
    return True


def to_int(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() else None


def keyed(text: str) -> dict[str, int]:
    """'key value' lines (cpu.stat, memory.stat, memory.events, oom_control) → dict."""
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if v.strip().isdigit():
            out[k] = int(v)
    return out


def wait_until(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True
