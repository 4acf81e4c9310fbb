"""Per-box cache and temp dirs, so copies of one app never share build or temp state.

XDG_CACHE_HOME and TMPDIR are the box's own. Download caches are the opposite: pip, uv,
npm, yarn, pnpm and cargo download into one host-wide cache under $WTBOX_HOME/downloads/
(downloads.py), so a new box does not fetch again what another one already has. [box]
cache_env points further variables into the box's own cache dir.

A sandboxed box shares nothing writable with another: a shared download cache (or bytecode
prefix) would be a channel from one box into the next (a poisoned wheel, a .pyc planted for
another box's source). Its download caches live in its own cache dir; it reads the host's and its layers' .pyc files
as they are and writes none (see Caches.create); what is
shared is what dependency layers hold (built once per lock file, with downloads/ writable, in a
sandbox of their own: resources/deps.py).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from worktreebox.box import is_box_id
from worktreebox.layers import downloads
from worktreebox.providers.sandbox import provider_of, sandboxed
from worktreebox.resources.base import Creation, Resource

if TYPE_CHECKING:
    from pathlib import Path

    from worktreebox.box import Box
    from worktreebox.context import HostContext as Host


class Caches(Resource):
    name = "caches"
    phase = "caches"
    parallel = True

    def create(self, c: Creation) -> None:
        box = c.box
        for d in (box.cache_dir, box.tmp_dir, box.logs_dir, box.run_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        c.env["XDG_CACHE_HOME"] = str(box.cache_dir)
        c.env["TMPDIR"] = str(box.tmp_dir)
        if sandboxed(box):  # nothing writable shared with other boxes (see the module docstring)
            # No prefix (empty is unset for Python, also over one the caller's shell sets): with one of
            # its own, the box never read the interpreter's precompiled standard library, and its first
            # Python process compiled everything it imported again (`python -c pass`: 150 ms, not 40).
            # It reads the .pyc files that are there (the standard library's, its dependency layers')
            # and writes none: a written one is checked by its source's mtime in whole seconds and its
            # size, so an edit of the same size within the second of an import (agents edit that fast)
            # ran the old code. The box's own modules are compiled when imported, a few ms each.
            c.env["PYTHONPYCACHEPREFIX"] = ""
            c.env["PYTHONDONTWRITEBYTECODE"] = "1"
            c.env.update({var: str(box.cache_dir / "downloads" / sub) for var, sub in downloads.CACHES.items()})
        else:
            # One prefix per host, not per box: bytecode is keyed by source path, so boxes never
            # collide, while the stdlib's .pyc files are compiled once instead of once per box
            # (a per-box prefix made every Python start in a new box 0.5-2 s slower). Box sources
            # land under <prefix>/<box dir>, which destroy() removes.
            c.env["PYTHONPYCACHEPREFIX"] = str(pycache_prefix(c.host))
            c.env.update(downloads.env(c.host.home))
        owner = provider_of(box).box_user() if sandboxed(box) else None
        for var, sub in c.config.box.cache_env.items():
            path = box.cache_dir / sub
            path.mkdir(parents=True, exist_ok=True)
            if owner is not None:  # the box's user writes there
                for made in [path, *path.parents]:
                    if made == box.cache_dir.parent:
                        break
                    os.chown(made, *owner)
            c.env[var] = str(path)

    def destroy(self, host: Host, box: Box) -> None:
        # Everything else lives under boxes/<id>, which Host removes last.
        import shutil

        shutil.rmtree(pycache_prefix(host) / str(box.dir).lstrip("/"), ignore_errors=True)

    def discover(self, host: Host) -> set[str]:
        """boxes/<id> directories."""
        try:
            return {p.name for p in host.boxes_dir.iterdir() if is_box_id(p.name)}
        except FileNotFoundError:
            return set()


def pycache_prefix(host: Host) -> Path:
    return host.home / "pycache"
