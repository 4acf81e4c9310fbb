"""Which process a pid is: alive or not, (pid, start time) identity, its parent, name and command
line; and who must never be stopped (the caller and its ancestors)."""
from __future__ import annotations

import os
from collections.abc import Sequence

from worktreebox.system import procfs

# The `wtbox` launcher a CLI server's child runs a command for (cli/server.py): its caller.
_ACTING_FOR: list[int] = []


def identity(pid: int) -> list[int] | None:
    """[pid, start time in clock ticks]: survives pid reuse, unlike a bare pid."""
    fields = procfs.stat_fields(pid)
    try:
        return [pid, int(fields[19])] if fields else None
    except (IndexError, ValueError):
        return None


def is_alive(ident: Sequence[int] | None) -> bool:
    """True when the process named by `identity()` is still the same live process."""
    if not ident:
        return False
    current = identity(ident[0])
    return current is not None and current[1] == ident[1] and pid_alive(ident[0])


def pid_alive(pid: int | None) -> bool:
    """True when the pid exists and is not a zombie."""
    if not pid:
        return False
    fields = procfs.stat_fields(pid)
    return fields is not None and bool(fields) and fields[0] not in (b"Z", b"X")


def parent_of(pid: int) -> int | None:
    fields = procfs.stat_fields(pid)
    try:
        return int(fields[1]) if fields else None
    except (IndexError, ValueError):
        return None


def act_for(pid: int) -> None:
    """This process runs a command on behalf of process `pid`: spare it and its ancestors as our own."""
    _ACTING_FOR.append(pid)


def caller_and_ancestors() -> set[int]:
    """Ourselves and our ancestors (and those of the launcher we serve, if any): `wtbox rm` run
    from a shell inside the box must not kill that shell."""
    out = set()
    for start in (os.getpid(), *_ACTING_FOR):
        pid: int | None = start
        while pid and pid > 1 and pid not in out:
            out.add(pid)
            pid = parent_of(pid)
    return out


cmdline = procfs.cmdline
comm = procfs.comm


def describe(pid: int) -> str:
    """'pid 123 (python3 app.py)' for messages; one line, at most 80 characters of command."""
    if not pid:
        return "a process of another user"
    cmd = " ".join(" ".join(cmdline(pid)).split())[:80] or comm(pid) or "?"
    return f"pid {pid} ({cmd})"
