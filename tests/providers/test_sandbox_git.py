"""Git inside a sandboxed box: it commits on its branch through a git dir of its own that borrows
the repository's objects, cannot change the repository or see other boxes' branches, and the host
brings its branch back without running anything of the box's as root."""
from __future__ import annotations

import os

import pytest
from helpers import git
from sandbox_helpers import end_box, make_box, needs_sandbox_tools

from worktreebox.providers.sandbox import gitdir
from worktreebox.system.users import give_tree

pytestmark = [needs_sandbox_tools(),
              pytest.mark.skipif(os.geteuid() != 0, reason="these tests make the root-mode sandbox")]

BOX = "task-dddddddd"
BRANCH = f"wtbox/{BOX}"
COMMIT = "git -c user.name=agent -c user.email=agent@box commit -q"


@pytest.fixture
def repo(make_repo):
    repo = make_repo({"app.py": "print('hello')\n"})
    git(repo, "branch", "wtbox/other-eeeeeeee")  # another box's branch
    git(repo, "tag", "v1")
    return repo


@pytest.fixture
def box(repo, tmp_path):
    sha = git(repo, "rev-parse", "HEAD").strip()
    made = make_box(tmp_path / "home", BOX, repo_git=gitdir.common_dir(repo))
    try:
        gitdir.make(repo, made.dir / "git", sha)
        gitdir.worktree_add(made.dir / "git", made.worktree, BRANCH, sha)
        # the files the tree view brings in the real flow (the worktree dir is the box user's already)
        git(made.worktree, "-c", "safe.directory=*", "checkout", "-q", "-f", BRANCH)
        git(repo, "branch", BRANCH, sha)  # keeps the base alive and names the box in the repository
        for path in (made.dir / "git", made.worktree):
            give_tree(path, made.holder.uid, made.holder.gid)
        yield made
    finally:
        end_box(made)


def test_the_box_commits_on_its_branch_and_sees_the_repositorys_refs_but_no_other_box(box):
    assert box.run("git status --porcelain").stdout == ""
    work = box.run(f"echo \"print('box')\" >> app.py && {COMMIT} -am 'box work' && git log --format=%s -2")
    assert work.stdout.splitlines() == ["box work", "initial"], work.stderr
    refs = box.run("git branch -a --format='%(refname:short)'; git tag").stdout.split()
    assert sorted(refs) == sorted(["main", BRANCH, "v1"])
    assert box.run("git diff --stat main...HEAD").stdout.strip().startswith("app.py")


def test_the_box_cannot_change_the_repository(box, repo):
    before = {ref: git(repo, "rev-parse", ref).strip() for ref in ("main", "wtbox/other-eeeeeeee", BRANCH)}
    config = (repo / ".git" / "config").read_text()
    common = gitdir.common_dir(repo)
    box.run(f"{COMMIT} --allow-empty -m x")
    attempts = [f"git push -q {repo} HEAD:main", f"git push -q {repo} HEAD:refs/heads/new",
                f"echo x >> {common}/config", f"rm -r {common}/objects/pack", f"touch {common}/objects/planted",
                f"git --git-dir={common} branch -D wtbox/other-eeeeeeee",
                f"git --git-dir={common} update-ref refs/heads/main HEAD"]
    failed = {cmd: box.run(cmd).returncode != 0 for cmd in attempts}
    assert all(failed.values()), failed
    box.run("git update-ref refs/heads/main HEAD")  # its own snapshot of main: allowed, and its business
    assert {ref: git(repo, "rev-parse", ref).strip() for ref in before} == before
    assert git(repo, "branch", "--list", "new") == ""
    assert (repo / ".git" / "config").read_text() == config
    git(repo, "fsck", "--no-dangling")


def test_the_host_fetches_the_box_branch_back_through_the_box(box, repo):
    box.run(f"echo more >> app.py && {COMMIT} -am 'box work'")
    tip = box.run("git rev-parse HEAD").stdout.strip()
    assert git(repo, "rev-parse", BRANCH).strip() != tip
    gitdir.fetch_back(repo, box.dir / "git", BRANCH, box.sandbox.prefix(box.holder, cwd=box.dir / "git"))
    assert git(repo, "rev-parse", BRANCH).strip() == tip
    assert git(repo, "log", "--format=%s", "-1", BRANCH).strip() == "box work"
    git(repo, "fsck", "--no-dangling")


def test_what_the_box_plants_in_its_git_config_never_runs_as_root_on_the_host(box, repo):
    """core.fsmonitor is a command git runs on status: a box sets it; the host's fetch never runs
    it, and the host's status questions run inside the box, as the box's user."""
    marker = box.dir / "home" / "fsmonitor-ran"
    box.run(f"git config core.fsmonitor 'touch {marker}; false'")
    gitdir.fetch_back(repo, box.dir / "git", BRANCH, box.sandbox.prefix(box.holder, cwd=box.dir / "git"))
    assert not marker.exists()
    status = box.sandbox.command(box.holder, gitdir.box_git([], "status", "--porcelain"), cwd=box.worktree)
    import subprocess

    subprocess.run(status, capture_output=True, env=box.env(), check=False)
    assert marker.exists() and marker.stat().st_uid == box.holder.uid != 0
