"""Reflink copies (`cp --reflink=always`): a private copy that shares blocks with the tree until
written (btrfs, XFS, bcachefs); nothing to mount."""
from __future__ import annotations

import subprocess
from pathlib import Path

from worktreebox.providers.mounts.base import MountError, MountProvider


class Reflink(MountProvider):
    name = "reflink"
    mounts = False
    same_inodes = False

    def attach(self, lower: Path, target: Path, scratch: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        copy_tree(lower, target, ["--reflink=always"])

    def probe(self, scratch: Path) -> str | None:
        try:
            scratch.mkdir(parents=True, exist_ok=True)
            (scratch / "a").write_text("x")
            proc = subprocess.run(["cp", "--reflink=always", str(scratch / "a"), str(scratch / "b")],
                                  capture_output=True, text=True)
        except OSError as e:
            return str(e)
        if proc.returncode != 0:
            return "this file system cannot make reflink copies"
        return None


def copy_tree(lower: Path, target: Path, flags: list[str]) -> None:
    """`cp -a lower/. target/` (keeps modes, symlinks and times)."""
    proc = subprocess.run(["cp", "-a", *flags, f"{lower}/.", f"{target}/"], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise MountError(f"copying {lower} to {target} failed: {lines[-1] if lines else proc.returncode}.")
