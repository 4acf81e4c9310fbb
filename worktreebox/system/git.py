"""Thin git helpers. Plain `git` subprocesses: importing gitpython costs ~100 ms per
command and we only need a handful of porcelain calls.

A sandboxed box's worktree and git dir are the box's to write: git run there by the host would
run what the box put in its config (core.fsmonitor, hooks) as the host's user. The helpers that
read or write a box's git take its `launcher` (procs.Launcher): git then runs inside the box, as
its user."""
from __future__ import annotations

import functools
import os
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from worktreebox.errors import UsageError, WtboxError
from worktreebox.system import cancel

if TYPE_CHECKING:
    from collections.abc import Callable

    from worktreebox.system.procs import Launcher

_GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}


def git(repo: str | Path, *args: str, check: bool = True, timeout: float = 300,
        input: str | None = None, launcher: Launcher | None = None) -> subprocess.CompletedProcess:
    argv, env = _command(repo, args)
    if launcher is not None and launcher.sandboxed:
        argv = launcher.command(argv, repo)
    try:
        proc = cancel.run(argv, capture_output=True, text=True, env=env, timeout=timeout, input=input)
    except FileNotFoundError:
        raise WtboxError(NOT_INSTALLED) from None
    return _checked(proc, repo, args) if check else proc


NOT_INSTALLED = "git is not installed; install it with 'apt-get install git'."


def _checked(proc: subprocess.CompletedProcess, repo: str | Path, args: tuple[str, ...]) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise WtboxError(f"git {args[0]} failed in {repo}: {msg[-1] if msg else 'exit ' + str(proc.returncode)}.")
    return proc


def started(repo: str | Path, *args: str, check: bool = True) -> Callable[[], subprocess.CompletedProcess]:
    """`git(repo, *args)` begun now, beside the caller's own work, without a thread; calling the
    result waits for it and raises as git() does."""
    argv, env = _command(repo, args)
    try:
        proc = subprocess.Popen(argv, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    except FileNotFoundError:
        raise WtboxError(NOT_INSTALLED) from None

    def result() -> subprocess.CompletedProcess:
        out, err = proc.communicate()
        done = subprocess.CompletedProcess(argv, proc.returncode, out, err)
        return _checked(done, repo, args) if check else done
    return result


def _command(repo: str | Path, args: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """git's argv and environment for `args` in `repo` (no prompt, C locale: output we parse)."""
    return ["git", "-C", str(repo), *args], {**os.environ, **_GIT_ENV}


def out(repo: str | Path, *args: str, launcher: Launcher | None = None) -> str:
    return git(repo, *args, launcher=launcher).stdout.strip()


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


def check_branch_name(repo: str | Path, name: str, what: str = "branch") -> str:
    """A name git accepts for a new branch (and not an option in disguise), else UsageError."""
    if not name or name.startswith("-") or git(repo, "check-ref-format", "--branch", name, check=False).returncode != 0:
        raise UsageError(f"{name!r} is not a valid git {what} name.")
    return name


@functools.lru_cache(maxsize=4)
def files_at(repo: str | Path, sha: str) -> dict[str, str]:
    """path -> blob id of every file in the commit (a commit's content never changes, so one
    `git ls-tree` per commit serves the dependency layers and the migration hash). Read-only."""
    files = {}
    for entry in out(repo, "ls-tree", "-r", "-z", "--full-tree", sha).split("\0"):
        meta, _, path = entry.partition("\t")
        parts = meta.split()
        if len(parts) == 3 and parts[1] == "blob":
            files[path] = parts[2]
    return files


def repoint_worktree(worktree: Path) -> None:
    """After a worktree's directory moved: write the new path into its admin dir's `gitdir` (what
    `git worktree repair` does for this case, without a process; gitrepository-layout(5))."""
    dotgit = worktree / ".git"
    try:
        admin = dotgit.read_text().removeprefix("gitdir:").strip()
    except OSError:
        return
    gitdir = Path(admin) / "gitdir"
    if gitdir.exists() and gitdir.read_text().strip() != str(dotgit):
        from worktreebox.system.fsutil import atomic_write

        atomic_write(gitdir, f"{dotgit}\n")


def tips(repo: str | Path, *, but: str | None = None) -> list[str]:
    """The commits the repository's branches and remote-tracking branches point at (but `but`'s)."""
    out = git(repo, "for-each-ref", "--format=%(objectname) %(refname)", "refs/heads", "refs/remotes", check=False)
    skip = f"refs/heads/{but}" if but else None
    return sorted({line.split(" ", 1)[0] for line in out.stdout.splitlines() if line and line.split(" ", 1)[1] != skip})


_COMMIT_TIME = ("show", "-s", "--format=%ct")


def commit_time(repo: str | Path, sha: str) -> int | None:
    """The committer time of a commit (seconds since the epoch): a box's SOURCE_DATE_EPOCH."""
    proc = git(repo, *_COMMIT_TIME, sha, check=False)
    return _epoch(proc.returncode, proc.stdout)


def commit_time_later(repo: str | Path, sha: str) -> Callable[[], int | None]:
    """`commit_time`, its git begun now beside the caller's own work (a box's making: ~8 ms it waited
    for at the end); calling the result waits for it."""
    try:
        done = started(repo, *_COMMIT_TIME, sha, check=False)
    except (OSError, WtboxError):
        return lambda: None
    return lambda: _epoch((proc := done()).returncode, proc.stdout)


def _epoch(returncode: int, out: str) -> int | None:
    return int(out.strip()) if returncode == 0 and out.strip().isdigit() else None


def show_file(repo: Path, sha: str, path: str) -> str | None:
    proc = git(repo, "show", f"{sha}:{path}", check=False)
    return proc.stdout if proc.returncode == 0 else None


def unique_commits(repo: str | Path, branch: str, base_sha: str | None = None,
                   launcher: Launcher | None = None, kept: list[str] | None = None) -> int:
    """How many commits of `branch` no other branch, remote (or the base commit) has; 0 when unknown.
    `kept`: the commits that count as saved instead of every other branch and remote (a sandboxed
    box's own git dir goes with the box: only what its repository holds is saved)."""
    short = branch.removeprefix("refs/heads/")
    others = kept if kept is not None else [f"--exclude={short}", "--branches", "--remotes"]
    args = ["rev-list", "--count", f"refs/heads/{short}", "--not", *others]
    if base_sha:
        args.append(base_sha)
    proc = git(repo, *args, check=False, launcher=launcher)
    return int(proc.stdout.strip() or 0) if proc.returncode == 0 else 0


def refs_with_unique_commits(repo: str | Path, refs: list[str]) -> set[str]:
    """The branches among `refs` that unique_commits() finds commits in (no other branch or remote
    has them), in two git calls in the usual case instead of one per branch: the commits that only
    `refs` reach, and the tips. A branch whose tip another branch or remote reaches has none; one
    whose tip only `refs` reach is checked alone (its commits may be another of `refs`' too)."""
    if not refs:
        return set()
    shorts = [r.removeprefix("refs/heads/") for r in refs]
    heads = [f"refs/heads/{s}" for s in shorts]
    only = git(repo, "rev-list", *heads, "--not", *(f"--exclude={s}" for s in shorts), "--branches", "--remotes",
               check=False)
    if only.returncode != 0:
        return {s for s in shorts if unique_commits(repo, s)}
    reached_only_by_refs = set(only.stdout.split())
    if not reached_only_by_refs:
        return set()
    tips = git(repo, "rev-parse", *heads, check=False)
    if tips.returncode != 0:
        return {s for s in shorts if unique_commits(repo, s)}
    return {s for s, tip in zip(shorts, tips.stdout.split(), strict=False)
            if tip in reached_only_by_refs and unique_commits(repo, s)}


def unsaved_work(worktree: Path, branch: str, base_sha: str | None, launcher: Launcher | None = None,
                 kept: list[str] | None = None) -> str | None:
    """Why removing this worktree would lose work, or None.

    Unsaved = uncommitted changes (untracked files included, ignored ones not), or
    commits on the box branch that are on no other branch, remote or the base commit.
    """
    if not worktree.is_dir():
        return None
    proc = git(worktree, "status", "--porcelain", "--untracked-files=normal", check=False, launcher=launcher)
    if proc.returncode != 0 and "not a git repository" not in proc.stderr:  # no git left: nothing of it to keep
        lines = proc.stderr.strip().splitlines()  # what cannot be looked at is not known to be safe to delete
        return f"a worktree whose state git cannot read ({lines[0] if lines else 'exit ' + str(proc.returncode)})"
    if proc.stdout.strip():
        n = len(proc.stdout.strip().splitlines())
        return f"{n} uncommitted change{'s' if n != 1 else ''}"
    n = unique_commits(worktree, branch, base_sha, launcher, kept)
    if n:
        return f"{n} commit{'s' if n != 1 else ''} on {branch.removeprefix('refs/heads/')} that no other branch has"
    return None


# ---------------------------------------------------------------------- saving and merging work
# (fan-out and pick: commits that only preserve work, the diff of an attempt, merging a branch)

_IDENTITY = {"GIT_AUTHOR_NAME": "wtbox", "GIT_AUTHOR_EMAIL": "wtbox@localhost",
             "GIT_COMMITTER_NAME": "wtbox", "GIT_COMMITTER_EMAIL": "wtbox@localhost"}
_SHORTSTAT = re.compile(r"(\d+) (file|insertion|deletion)")


def save_work(worktree: Path, subject: str, body: str = "", *, label: str = "the worktree",
              launcher: Launcher | None = None) -> str | None:
    """Commit everything uncommitted in `worktree` onto its branch; the new sha, or None if clean.

    `label` names the worktree in the error (e.g. the box id)."""
    if not worktree.is_dir():
        return None
    status = git(worktree, "status", "--porcelain", "--untracked-files=normal", check=False, launcher=launcher)
    if status.returncode != 0 or not status.stdout.strip():
        return None
    git(worktree, "add", "-A", launcher=launcher)
    msg = subject + ("\n\n" + body if body else "")
    # --no-verify: this commit only preserves work; a hook must not be able to refuse or rewrite it.
    proc = _git_as_someone(worktree, "commit", "-q", "--no-verify", "-m", msg, launcher=launcher)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise WtboxError(f"Saving the work of {label} failed: {lines[-1] if lines else proc.returncode}.")
    return out(worktree, "rev-parse", "HEAD", launcher=launcher)


def _git_as_someone(cwd: Path, *args: str, launcher: Launcher | None = None) -> subprocess.CompletedProcess:
    """A git command that makes commits: with a stand-in identity when the repo has none (work must not be lost)."""
    identity = [] if git(cwd, "config", "user.email", check=False, launcher=launcher).returncode == 0 else \
        [f"{k}={v}" for k, v in _IDENTITY.items()]
    if launcher is not None and launcher.sandboxed:
        return git(cwd, *args, check=False, launcher=launcher.with_env(dict(i.split("=", 1) for i in identity)))
    env = {**os.environ, **_GIT_ENV, **dict(i.split("=", 1) for i in identity)}
    return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, env=env)


def diff_stat(worktree: Path, base: str | None, launcher: Launcher | None = None) -> dict[str, int] | None:
    """Files, insertions and deletions of the worktree against `base`; None when unknown."""
    if not base or not worktree.is_dir():
        return None
    proc = git(worktree, "diff", "--shortstat", base, check=False, launcher=launcher)
    if proc.returncode != 0:
        return None
    counts = {"files": 0, "insertions": 0, "deletions": 0}
    for num, word in _SHORTSTAT.findall(proc.stdout):
        counts[{"file": "files", "insertion": "insertions", "deletion": "deletions"}[word]] = int(num)
    return counts


def merge_branch(repo: str | Path, worktree: Path, branch: str, target: str) -> str:
    """Merge `branch` (checked out in `worktree`, its commits in `repo`) into `target` in `repo`; a
    conflict changes nothing."""
    sha = out(repo, "rev-parse", f"refs/heads/{branch}")
    exists = git(repo, "rev-parse", "--verify", "--quiet", f"refs/heads/{target}", check=False).returncode == 0
    if not exists:
        git(repo, "branch", target, sha)
        return target
    checked_out = worktree_of(repo, target)
    if checked_out is not None:
        dirty = git(checked_out, "status", "--porcelain", "--untracked-files=no", check=False).stdout.strip()
        if dirty:
            raise WtboxError(f"{target} is checked out in {checked_out} with uncommitted changes; commit or stash "
                             "them first (nothing was merged or removed).")
        proc = _git_as_someone(checked_out, "merge", "--no-edit", branch)
        if proc.returncode != 0:
            _merge_failed(checked_out, proc, branch, target)
        return target
    old = out(repo, "rev-parse", f"refs/heads/{target}")
    if git(repo, "merge-base", "--is-ancestor", old, sha, check=False).returncode == 0:
        git(repo, "update-ref", f"refs/heads/{target}", sha, old)  # fast-forward
        return target
    # Not checked out and diverged: merge in a throwaway worktree, then move the branch.
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="wtbox-merge-"))
    try:
        git(repo, "worktree", "add", "--quiet", "--detach", str(tmp / "wt"), old)
        proc = _git_as_someone(tmp / "wt", "merge", "--no-edit", branch)
        if proc.returncode != 0:
            _merge_failed(tmp / "wt", proc, branch, target)
        git(repo, "update-ref", f"refs/heads/{target}", out(tmp / "wt", "rev-parse", "HEAD"), old)
    finally:
        git(repo, "worktree", "remove", "--force", str(tmp / "wt"), check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _merge_failed(wt: Path, proc: subprocess.CompletedProcess, branch: str, target: str) -> None:
    conflicts = git(wt, "diff", "--name-only", "--diff-filter=U", check=False).stdout.split()
    git(wt, "merge", "--abort", check=False)
    if conflicts:
        raise WtboxError(f"Merging {branch} into {target} conflicts in {', '.join(conflicts[:3])}; merge it by hand "
                         "(nothing was merged or removed).")
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    raise WtboxError(f"Merging {branch} into {target} failed ({lines[-1] if lines else proc.returncode}); "
                     "nothing was removed.")


def worktree_of(repo: str | Path, branch: str) -> Path | None:
    """The worktree in which `branch` is checked out, or None."""
    listing = out(repo, "worktree", "list", "--porcelain")
    path = None
    for line in listing.splitlines():
        if line.startswith("worktree "):
            path = Path(line[len("worktree "):])
        elif line == f"branch refs/heads/{branch}":
            return path
    return None
