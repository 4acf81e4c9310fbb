"""Pristine trees: one read-only checkout per base commit under $WTBOX_HOME/trees/<commit>/.

    trees/<commit>/tree/    the files of the commit, as `git checkout` writes them (filters, modes)
    trees/<commit>/index    a git index of tree/ with its stat data filled in

A box's worktree is a copy-on-write view of tree/ with a copy of index as its own, so `git
status` in a fresh box finds every file unchanged without reading one. The entry is made
once per commit (single flight, see layerstore) and never written afterwards: boxes see it
only through their view. Commit ids name content, so two clones of one repo share trees.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from worktreebox.errors import WtboxError
from worktreebox.layers.store import LayerStore
from worktreebox.system import cancel, git


def store(home: Path) -> LayerStore:
    return LayerStore(Path(home) / "trees")


@contextlib.contextmanager
def use(home: Path, repo: str | Path, sha: str, *, on_wait: Callable[[], None] | None = None
        ) -> Iterator[tuple[Path, bool]]:
    """(trees/<sha>, built now) for the commit, made first if missing; kept from gc inside the block."""
    with store(home).use(sha, lambda tmp: build(Path(repo), sha, tmp), on_wait=on_wait) as found:
        yield found


def build(repo: Path, sha: str, dest: Path) -> None:
    """Check `sha` out into dest/tree with an index of its own (dest/index); the repo is not touched."""
    common = git.out(repo, "rev-parse", "--path-format=absolute", "--git-common-dir")
    tree = dest / "tree"
    tree.mkdir()
    env = {**os.environ, "GIT_INDEX_FILE": str(dest / "index"), "GIT_DIR": common, "GIT_WORK_TREE": str(tree),
           "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}
    env.pop("GIT_OBJECT_DIRECTORY", None)
    for args in (["read-tree", sha], ["checkout-index", "--all", "--force", "--index"]):
        # checkout-index --index writes each file's stat data into the index as it goes, which is
        # what makes `git status` in a box a stat-only pass.
        proc = cancel.run(["git", *args], cwd=tree, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            raise WtboxError(f"Checking out {sha[:12]} of {repo} into the tree store failed: "
                             f"{lines[-1] if lines else 'git exit ' + str(proc.returncode)}.")
    (dest / "meta.json").write_text(json.dumps({"commit": sha, "repo": str(repo), "built_at": time.time()}) + "\n")
