"""fuse-overlayfs: the same copy-on-write view as overlayfs, for users who may not mount overlayfs."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from worktreebox.providers.mounts.base import MountError, MountProvider, clean_env
from worktreebox.providers.mounts.overlay import Overlay, prepare_dirs, probe_cow

BINARY = "fuse-overlayfs"


class FuseOverlay(MountProvider):
    name = "fuse-overlayfs"

    @classmethod
    def check(cls) -> dict:
        exe = shutil.which(BINARY)
        return {"check": f"{BINARY} (optional)", "ok": True,
                "detail": exe or "not installed; unprivileged users get plain checkouts "
                                 "(apt-get install fuse-overlayfs)"}

    def attach(self, lower: Path, target: Path, scratch: Path) -> None:
        exe = shutil.which(BINARY)
        if not exe:
            raise MountError(f"{BINARY} is not installed (apt-get install fuse-overlayfs).")
        upper, work = prepare_dirs(target, scratch)
        opts = Overlay().options(lower, upper, work, volatile=False) + ",fsync=0"
        # It daemonizes once the mount is up; the daemon must not look like a box process
        # (clean env, cwd /), or tearing down the box's processes would cut its file system.
        proc = subprocess.run([exe, "-o", opts, str(target)], env=clean_env(), cwd="/", stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if "unknown argument ignored" not in ln]
            raise MountError(f"{BINARY} on {target} failed: {lines[-1] if lines else 'exit ' + str(proc.returncode)}.")

    def probe(self, scratch: Path) -> str | None:
        if not shutil.which(BINARY):
            return f"{BINARY} is not installed"
        if not os.path.exists("/dev/fuse"):
            return "/dev/fuse does not exist"
        return probe_cow(self, scratch)
