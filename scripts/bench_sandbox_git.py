"""Git in a sandboxed box, two designs measured side by side on a generated repo of Django's size
(6,800 files, 71 MB; bench.py's generator, packed):

- `own_git_dir` (what providers/sandbox/gitdir.py makes): a git dir of the box's own whose
  objects/info/alternates names the repository's object store (bound read-only), a snapshot of
  its refs, the worktree's admin dir inside it;
- `overlay_view` (the design it replaced, prototyped here only): `git worktree add` in the
  repository as today, then a copy-on-write overlay of the repository's .git (lower) with an
  upper dir owned by the box user, in which every directory and file git writes on a commit was
  made or copied ahead (objects/xx, objects/pack, refs/heads/wtbox, the branch's reflog,
  worktrees/<name>/*), bound over <repo>/.git inside the box.

Both boxes get the same worktree (an overlay view of the commit's tree owned by the box user,
with the tree's index), so only git's part differs: made, first `git status` and a commit inside
the box (through the launcher), the branch fetched back (upload-pack inside the box), removed.
"""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from worktreebox.providers.mounts.base import sys_mount, unmount_all
from worktreebox.providers.mounts.overlay import Overlay
from worktreebox.providers.sandbox import gitdir
from worktreebox.system import procs
from worktreebox.system.users import give_tree

COMMIT = ["git", "-c", "user.name=bench", "-c", "user.email=bench@box", "commit", "-q", "-am", "box work"]


def _git(*args: str, **kw) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True, **kw).stdout


def bench_git(boxes, runs: int, work: Path) -> dict:
    from bench import build_repo

    repo = build_repo(work / "bench-django-repo", files=6800, total_mb=71.0)
    if int(_git("-C", str(repo), "count-objects", "-v").split("count: ")[1].split()[0]) > 100:
        _git("-C", str(repo), "gc", "-q")  # a real repository is packed
    sha = _git("-C", str(repo), "rev-parse", "HEAD").strip()
    _git("-C", str(repo), "worktree", "prune")  # what an interrupted run left
    for ref in _git("-C", str(repo), "for-each-ref", "--format=%(refname:short)", "refs/heads/wtbox/").split():
        _git("-C", str(repo), "branch", "-D", ref)
    uid, gid = boxes.sandbox.box_user()
    tree = _tree(boxes.home / "trees" / sha, repo, sha, uid, gid)
    steps: dict[str, dict[str, list[float]]] = {"own_git_dir": {}, "overlay_view": {}}
    for _ in range(max(3, runs // 2)):
        for design in steps:
            for step, took in _one_box(boxes, repo, sha, tree, design, uid, gid).items():
                steps[design].setdefault(step, []).append(took)
    from bench_sandbox import stats

    return {design: {step: stats(v) for step, v in s.items()} for design, s in steps.items()}


def _tree(dest: Path, repo: Path, sha: str, uid: int, gid: int) -> Path:
    """The commit's files (owned by the box user, as copy-up needs) and their index, made once."""
    if not (dest / "index").exists():
        (dest / "tree").mkdir(parents=True)
        subprocess.run(f"git -C {repo} archive {sha} | tar -x -C {dest / 'tree'}", shell=True, check=True)
        _git("-C", str(repo), "read-tree", f"--index-output={dest / 'index'}", sha)
        give_tree(dest / "tree", uid, gid)
    return dest


def _one_box(boxes, repo: Path, sha: str, tree: Path, design: str, uid: int, gid: int) -> dict[str, float]:
    spec = boxes.spec(repo_git=None)
    box_dir, wt = spec.box_dir, spec.box_dir / "worktree"
    branch = f"wtbox/{spec.box_id}"
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    if design == "own_git_dir":
        git_dir = box_dir / "git"
        gitdir.make(repo, git_dir, sha)
        gitdir.worktree_add(git_dir, wt, branch, sha)
        _git("-C", str(repo), "branch", branch, sha)
        give_tree(git_dir, uid, gid)
        bound_git = (gitdir.common_dir(repo), False)
        source = git_dir
    else:
        _git("-C", str(repo), "worktree", "add", "--quiet", "--no-checkout", "-b", branch, str(wt), sha)
        view = _overlay_view(repo, box_dir, wt, branch, uid, gid)
        bound_git = (view, True)
        source = gitdir.common_dir(repo)  # the view's path inside the box
    out["git_made"] = time.perf_counter() - t0
    _attach_worktree(wt, tree, uid, gid)
    from worktreebox.providers.sandbox.base import Bind

    spec.binds = [b for b in spec.binds if b.src.name != "git" or design == "own_git_dir"]
    if design == "overlay_view":  # the view shown at the repository's .git, writable
        spec.binds.append(_ViewBind(bound_git[0], gitdir.common_dir(repo)))
    else:
        spec.binds.append(Bind(bound_git[0], writable=False))
    holder = boxes.create(spec)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(box_dir / "home"), "WTBOX_ID": spec.box_id,
           "WTBOX_BOX_DIR": str(box_dir)}
    try:
        def inside(argv: list[str]) -> float:
            t = time.perf_counter()
            proc = procs.spawn(boxes.sandbox.command(holder, argv, cwd=wt), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cgroup=boxes.leaf(spec, "_exec"))
            _, err = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"{design}: {' '.join(argv)} failed: {err.decode().strip()[-300:]}")
            return time.perf_counter() - t

        out["first_status_in_box"] = inside(["git", "status", "--porcelain"])
        (wt / "pkg0" / "mod0").mkdir(parents=True, exist_ok=True)
        inside(["sh", "-c", "echo change >> wtbox.toml"])
        out["commit_in_box"] = inside(COMMIT)
        t = time.perf_counter()
        # the overlay design's branch is checked out in the repository: fetch must be told it may move it
        extra = ("--update-head-ok",) if design == "overlay_view" else ()
        gitdir.fetch_back(repo, source, branch, boxes.sandbox.prefix(holder, cwd="/"), extra=extra)
        out["fetch_back"] = time.perf_counter() - t
    finally:
        boxes.end(spec)
    t = time.perf_counter()
    unmount_all(box_dir)
    shutil.rmtree(box_dir, ignore_errors=True)
    if design == "overlay_view":
        _git("-C", str(repo), "worktree", "prune")
    _git("-C", str(repo), "branch", "-D", branch)
    out["removed"] = time.perf_counter() - t
    return out


class _ViewBind:
    """A writable bind whose source and destination differ (the view shown at <repo>/.git)."""

    writable = True

    def __init__(self, src: Path, dst: Path) -> None:
        self.src, self.dst = src, dst


def _attach_worktree(wt: Path, tree: Path, uid: int, gid: int) -> None:
    """What the worktree resource does: the tree's view on the worktree dir, git's pointer written
    through it, the tree's index as the worktree's."""
    pointer = (wt / ".git").read_text()
    (wt / ".git").unlink()
    Overlay().attach(tree / "tree", wt, wt.parent)
    (wt / ".git").write_text(pointer)
    admin = Path(pointer.split(":", 1)[1].strip())
    shutil.copyfile(tree / "index", admin / "index")
    import os

    os.chown(wt / ".git", uid, gid)
    os.chown(wt.parent / "upper", uid, gid)
    os.chown(admin / "index", uid, gid)


def _overlay_view(repo: Path, box_dir: Path, wt: Path, branch: str, uid: int, gid: int) -> Path:
    """The repository's .git as a copy-on-write view whose upper dir the box user owns, with what a
    commit writes made ahead (each missing piece was a 'Permission denied' in the prototype)."""
    common = gitdir.common_dir(repo)
    admin = Path((wt / ".git").read_text().split(":", 1)[1].strip())
    upper, work, view = box_dir / "git-upper", box_dir / "git-work", box_dir / "git-view"
    for d in [f"objects/{i:02x}" for i in range(256)] + ["objects/pack", "objects/info", "refs/heads/wtbox",
                                                          "logs/refs/heads/wtbox", "worktrees"]:
        (upper / d).mkdir(parents=True, exist_ok=True)
    shutil.copytree(admin, upper / "worktrees" / admin.name)
    shutil.copy2(common / "logs" / "refs" / "heads" / branch, upper / "logs" / "refs" / "heads" / branch)
    give_tree(upper, uid, gid)
    for d in (work, view):
        d.mkdir()
    sys_mount("overlay", view, "overlay", Overlay().options(common, upper, work))
    return view
