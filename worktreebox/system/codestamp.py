"""What a warm process compares before it serves: has wtbox's code changed since it loaded it?

The CLI server (cli/server.py) and the supervisors' zygote (services/zygote.py) keep wtbox's
modules loaded for minutes; a `git pull`, an edit or a `pip install` meanwhile must not leave
them serving the old code. The stamp is the mtime and size of every .py file of the package (all
of it: a stamp of worktreebox/cli/ alone went on serving an edited host.py), the Python
executable and site-packages. About 2 ms for ~260 files, warm; 12 ms when the files' entries
are out of the kernel's cache.

A warm process that forks a command after its check (the CLI server) notes the stamp it checked in
the fork (`note_checked`); what that command asks of the zygote carries its digest, and a zygote
(or a launcher it forked ahead) whose own stamp has that digest runs the very code its caller runs,
as the disk held it a moment ago: it serves at once instead of walking the files again
(`changed_since`), in the wait of every supervisor's start.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys

Stamp = dict[str, tuple[int, int]]

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # worktreebox/


def code_stamp() -> Stamp:
    paths = [sys.executable, os.path.realpath(sys.executable)]
    paths += [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")]
    for root, dirs, files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        paths += [os.path.join(root, f) for f in files if f.endswith(".py")]
    out = {}
    for p in paths:
        with contextlib.suppress(OSError):
            st = os.stat(p)
            out[p] = (st.st_mtime_ns, st.st_size)
    return out


def first_change(before: Stamp, after: Stamp) -> str | None:
    """The first path (sorted) whose stamp differs, or None."""
    for p in sorted(before.keys() | after.keys()):
        if before.get(p) != after.get(p):
            return p
    return None


def digest(stamp: Stamp) -> str:
    return hashlib.sha256(json.dumps(sorted(stamp.items())).encode()).hexdigest()[:32]


_CHECKED: dict[str, str] = {}  # "digest": this process's code, as its warm parent found it on disk as it forked


def note_checked(stamp_digest: str) -> None:
    """In a command forked right after the stamp of this digest was found equal to the disk."""
    _CHECKED["digest"] = stamp_digest


def checked() -> str | None:
    """The digest of the code this process runs, checked against the disk as it was forked; None
    when nothing checked it (a command of its own Python, a test)."""
    return _CHECKED.get("digest")


def changed_since(stamp: Stamp, own: str, asker: str | None) -> str | None:
    """What `first_change` says of `stamp` against the disk now, unless the asker's checked code
    (`asker`: its `checked()`) is this process's (`own`: the digest of `stamp`)."""
    if asker is not None and asker == own:
        return None
    return first_change(stamp, code_stamp())
