"""Joining another process's namespace (setns(2)): os.setns from Python 3.12, libc's before.

A whole process joins a network namespace (the supervisor, while it has one thread); one thread
joins a UTS namespace for a moment (naming a sandbox's host: namespaces are per thread, and
unlike a mount or user namespace, a UTS one may be joined by one thread of many).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from worktreebox.system import procfs

CLONE_NEWUTS = 0x04000000
CLONE_NEWNET = 0x40000000


def join(path: str, nstype: int) -> None:
    """Move the calling thread into the namespace at `path` (a procfs ns file)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        join_fd(fd, nstype, path)
    finally:
        os.close(fd)


def join_fd(fd: int, nstype: int, what: str) -> None:
    setns = getattr(os, "setns", None)
    if setns is not None:
        setns(fd, nstype)
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols include libc's
    if libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), what)


@contextlib.contextmanager
def thread_in_uts(pid: int) -> Iterator[None]:
    """This thread in process `pid`'s UTS namespace for the block, then back in its own (if going
    back fails the thread must not run on elsewhere: the error ends the block's caller)."""
    own = os.open(procfs.namespace_file("thread-self", "uts"), os.O_RDONLY | os.O_CLOEXEC)
    try:
        join(procfs.namespace_file(pid, "uts"), CLONE_NEWUTS)
        try:
            yield
        finally:
            join_fd(own, CLONE_NEWUTS, "this thread's own UTS namespace")
    finally:
        os.close(own)
