"""The last fallback: no copy-on-write. A box's worktree is a plain `git worktree add`, and a
dependency layer is copied into it whole."""
from __future__ import annotations

from pathlib import Path

from worktreebox.providers.mounts.base import MountProvider
from worktreebox.providers.mounts.reflink import copy_tree


class Checkout(MountProvider):
    name = "checkout"
    mounts = False
    uses_tree = False
    same_inodes = False

    def attach(self, lower: Path, target: Path, scratch: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        copy_tree(lower, target, [])

    def probe(self, scratch: Path) -> str | None:
        return None
