"""Thin git helpers. Plain `git` subprocesses: importing gitpython costs ~100 ms per
command and we only need a handful of porcelain calls."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .errors import UsageError, WtboxError

_GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}


def git(repo: str | Path, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **_GIT_ENV}
    try:
        proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, env=env,
                              timeout=timeout)
    except FileNotFoundError:
        raise WtboxError("git is not installed; install it with 'apt-get install git'.") from None
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise WtboxError(f"git {args[0]} failed in {repo}: {msg[-1] if msg else 'exit ' + str(proc.returncode)}.")
    return proc


def out(repo: str | Path, *args: str) -> str:
    return git(repo, *args).stdout.strip()


def resolve_repo(path: str | Path | None) -> Path:
    """The main working tree of the repository containing `path` (default: cwd)."""
    where = Path(path or os.getcwd())
    if not where.exists():
        raise UsageError(f"The repository path {str(where)!r} does not exist.")
    proc = git(where, "rev-parse", "--is-bare-repository", "--path-format=absolute", "--git-common-dir", check=False)
    if proc.returncode != 0:
        raise UsageError(f"{where} is not inside a git repository; pass --repo PATH or cd into one.")
    bare, common = proc.stdout.split()
    if bare == "true":
        raise UsageError(f"{where} is a bare repository; wtbox needs a repository with a working tree.")
    root = Path(common).parent
    if git(root, "rev-parse", "--verify", "--quiet", "HEAD^{commit}", check=False).returncode != 0:
        raise UsageError(f"The repository {root} has no commits yet; commit something first.")
    return root


def resolve_commit(repo: Path, ref: str) -> str:
    if ref.startswith("-"):
        raise UsageError(f"{ref!r} is not a git ref.")
    proc = git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
    if proc.returncode != 0:
        raise UsageError(f"The ref {ref!r} does not name a commit in {repo}.")
    return proc.stdout.strip()


def show_file(repo: Path, sha: str, path: str) -> str | None:
    proc = git(repo, "show", f"{sha}:{path}", check=False)
    return proc.stdout if proc.returncode == 0 else None


def unique_commits(repo: str | Path, branch: str, base_sha: str | None = None) -> int:
    """How many commits of `branch` no other branch, remote (or the base commit) has; 0 when unknown."""
    short = branch.removeprefix("refs/heads/")
    args = ["rev-list", "--count", f"refs/heads/{short}", "--not", f"--exclude={short}", "--branches", "--remotes"]
    if base_sha:
        args.append(base_sha)
    proc = git(repo, *args, check=False)
    return int(proc.stdout.strip() or 0) if proc.returncode == 0 else 0


def unsaved_work(worktree: Path, branch: str, base_sha: str | None) -> str | None:
    """Why removing this worktree would lose work, or None.

    Unsaved = uncommitted changes (untracked files included, ignored ones not), or
    commits on the box branch that are on no other branch, remote or the base commit.
    """
    if not worktree.is_dir():
        return None
    proc = git(worktree, "status", "--porcelain", "--untracked-files=normal", check=False)
    if proc.returncode == 0 and proc.stdout.strip():
        n = len(proc.stdout.strip().splitlines())
        return f"{n} uncommitted change{'s' if n != 1 else ''}"
    n = unique_commits(worktree, branch, base_sha)
    if n:
        return f"{n} commit{'s' if n != 1 else ''} on {branch.removeprefix('refs/heads/')} that no other branch has"
    return None
