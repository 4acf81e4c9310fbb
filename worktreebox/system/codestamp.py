"""What a warm process compares before it serves: has wtbox's code changed since it loaded it?

The CLI server (cli/server.py) and the supervisors' zygote (services/zygote.py) keep wtbox's
modules loaded for minutes; a `git pull`, an edit or a `pip install` meanwhile must not leave
them serving the old code. The stamp is the mtime and size of every .py file of the package (all
of it: a stamp of worktreebox/cli/ alone went on serving an edited host.py), the Python
executable and site-packages. About 2 ms for ~260 files.
"""
from __future__ import annotations

import contextlib
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
