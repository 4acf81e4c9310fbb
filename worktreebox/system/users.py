"""The unprivileged system users wtbox runs things as when it runs as root.

`wtbox-pg` owns the embedded PostgreSQL cluster (initdb refuses root); `wtbox-box` runs every
process of a sandboxed box, so host files keep their permissions against it. Each is made once,
idempotently (`useradd --system`: no home, no login shell); two wtbox processes making the same
user at once both succeed.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

from worktreebox.errors import WtboxError

USERADD_EXISTS = 9  # useradd's exit status when the name is taken (made meanwhile by another process)


@dataclasses.dataclass(frozen=True)
class SystemUser:
    name: str
    uid: int
    gid: int
    home: str


def lookup(name: str) -> SystemUser | None:
    """The user called `name`, or None when there is none."""
    import pwd

    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    return SystemUser(name, pw.pw_uid, pw.pw_gid, pw.pw_dir)


def ensure(name: str, *, purpose: str) -> SystemUser:
    """The system user `name`, made when missing (root only); WtboxError naming `purpose` when it cannot be."""
    found = lookup(name)
    if found is not None:
        return found
    try:
        proc = subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
                               "/nonexistent", "--shell", "/usr/sbin/nologin", name], capture_output=True, text=True)
    except FileNotFoundError:
        raise WtboxError(f"Cannot create the system user {name!r} for {purpose}: useradd is not installed.") from None
    made = lookup(name)
    if made is None or proc.returncode not in (0, USERADD_EXISTS):
        raise WtboxError(f"Cannot create the system user {name!r} for {purpose}: "
                         f"{proc.stderr.strip() or 'useradd exited ' + str(proc.returncode)}.")
    return made


def give_tree(path: Path, uid: int, gid: int) -> None:
    """chown -R without following links (a tree or a dependency layer made by root for boxes to
    write through copy-up; 6,800 files: ~60 ms). The top comes last: whoever sees it given sees all."""
    for root, dirs, files in os.walk(path, topdown=False):
        for name in (*dirs, *files):
            os.lchown(os.path.join(root, name), uid, gid)
    os.lchown(path, uid, gid)
