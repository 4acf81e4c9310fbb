"""The git worktree of a box, on branch wtbox/<id>, and the untracked files it copies in."""
from __future__ import annotations

import random
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .. import git
from ..box import is_box_id
from ..errors import WtboxError
from .base import Creation, Resource, warn

if TYPE_CHECKING:
    from ..box import Box
    from ..context import HostContext as Host


class Worktree(Resource):
    name = "worktree"
    parallel = True

    def create(self, c: Creation) -> None:
        box = c.box
        # Concurrent `git worktree add` in one repo race on reading each other's half-written
        # .git/worktrees/<name>/ (all our worktrees share the basename "worktree"); git fails
        # with "failed to read ...". That is transient, so retry, reusing the branch if the
        # failed attempt already made it.
        for attempt in range(10):
            has_branch = git.git(box.repo, "rev-parse", "--verify", "--quiet", f"refs/heads/{box.branch}",
                                 check=False).returncode == 0
            args = [str(box.path), box.branch] if has_branch else ["-b", box.branch, str(box.path), c.base_sha]
            proc = git.git(box.repo, "worktree", "add", "--quiet", *args, check=False)
            if proc.returncode == 0:
                return
            if "failed to read" not in proc.stderr or attempt == 9:
                lines = proc.stderr.strip().splitlines()
                raise WtboxError(f"git worktree add failed in {box.repo}: {lines[-1] if lines else proc.returncode}.")
            time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))

    def finish(self, c: Creation) -> None:
        """[box] copy: bring untracked files (e.g. .env.example → .env) from the main checkout
        (after every create: the worktree exists and the files may name other resources' dirs)."""
        from ..config import path_inside

        repo = Path(c.box.repo)
        where = f"{c.config.source}: [box] copy"
        for src, dst in c.config.box.copy:
            if not (repo / src).exists():
                warn(f"[box] copy: {src} does not exist in {repo}; skipped.")
                continue
            # Resolved, not as written: a committed symlink may point anywhere.
            s, d = path_inside(repo, src, where), path_inside(c.box.path, dst, where)
            d.parent.mkdir(parents=True, exist_ok=True)
            if s.is_dir():
                shutil.copytree(s, d, symlinks=True, dirs_exist_ok=True)
            else:
                shutil.copy2(s, d)

    def destroy(self, host: "Host", box: "Box") -> None:
        repos = [box.repo] if box.repo and Path(box.repo).is_dir() else host.registry.select_repos()
        # Deleting thousands of files is most of what `git worktree remove` costs. Move the tree
        # out of the box (one rename), let git forget it (prune), and delete the files in a
        # detached process; `gc` empties trash/ if that process dies.
        trashed = move_to_trash(host, box.path, box.id)
        for repo in repos:
            if not Path(repo).is_dir():
                continue
            removed = not trashed and box.path.exists() and git.git(
                repo, "worktree", "remove", "--force", "--force", str(box.path), check=False).returncode == 0
            if not removed:
                # a worktree dir that is gone still "holds" its branch until pruned
                git.git(repo, "worktree", "prune", check=False)
            if box.data.get("keep_branch"):
                continue
            git.git(repo, "branch", "-D", box.branch, check=False)
        if box.path.exists():
            shutil.rmtree(box.path, ignore_errors=True)
        if box.path.exists():
            raise WtboxError(f"Could not delete the worktree {box.path}.")
        if trashed:
            empty_trash_in_background(host)

    def discover(self, host: "Host") -> set[str]:
        ids: set[str] = set()
        for repo in host.registry.select_repos():
            if not Path(repo).is_dir():
                continue
            checked_out = _checked_out_branches(repo)
            proc = git.git(repo, "for-each-ref", "--format=%(refname:short)", "refs/heads/wtbox/", check=False)
            for ref in proc.stdout.split():
                box_id = ref.removeprefix("wtbox/")
                if not is_box_id(box_id):
                    continue
                # A branch left without its worktree on purpose (rm --keep-branch, pick) that holds
                # commits no other branch has is the user's work, not an orphan.
                if ref not in checked_out and git.unique_commits(repo, ref):
                    continue
                ids.add(box_id)
        return ids


def _checked_out_branches(repo: str) -> set[str]:
    out = git.git(repo, "worktree", "list", "--porcelain", check=False).stdout
    return {line.split(" ", 1)[1].removeprefix("refs/heads/") for line in out.splitlines()
            if line.startswith("branch ")}


def trash_dir(host: "Host") -> Path:
    return host.home / "trash"


def move_to_trash(host: "Host", path: Path, box_id: str) -> bool:
    if not path.is_dir():
        return False
    import os
    import secrets

    trash = trash_dir(host)
    trash.mkdir(mode=0o700, exist_ok=True)
    try:
        os.rename(path, trash / f"{box_id}-{secrets.token_hex(3)}")
        return True
    except OSError:  # e.g. another filesystem: let git delete it in place
        return False


def empty_trash_in_background(host: "Host") -> None:
    import subprocess

    entries = [str(p) for p in trash_dir(host).iterdir()] if trash_dir(host).exists() else []
    if entries:
        subprocess.Popen(["rm", "-rf", "--", *entries], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
