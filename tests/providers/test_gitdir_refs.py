"""The refs a sandboxed box's git dir starts with are read from the repository's files, without a git
process: they must be exactly what `git for-each-ref` lists (packed and loose, tags annotated or not,
remote-tracking refs and a symbolic origin/HEAD), other boxes' branches left out, and git asked
whenever the files cannot be trusted."""
from __future__ import annotations

import os
import subprocess

from helpers import git

from worktreebox.providers.sandbox import gitdir


def _for_each_ref(repo) -> str:
    """The snapshot as the code made it before the reader: git's own listing, other boxes' refs left out."""
    lines = git(repo, "for-each-ref", "--format=%(objectname) %(refname)", *gitdir.SNAPSHOT_REFS).splitlines()
    return "".join(f"{line}\n" for line in sorted(lines, key=lambda s: s.split(" ", 1)[1])
                   if f" {gitdir.SKIPPED_REFS}" not in line)


def _rich_repo(make_repo, tmp_path):
    """A clone (refs/remotes/origin/*, a symbolic origin/HEAD) with packed refs, loose ones that
    override packed ones, annotated and lightweight tags, nested branch names and a box's branch."""
    upstream = make_repo({"a.txt": "1\n"}, name="upstream")
    git(upstream, "branch", "release/1.x")
    repo = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(upstream), str(repo)], check=True)
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "T")
    git(repo, "tag", "-a", "v1", "-m", "annotated")
    git(repo, "tag", "light")
    git(repo, "branch", "feature/deep/name")
    git(repo, "branch", "wtbox/other-eeeeeeee")
    git(repo, "pack-refs", "--all")
    (repo / "a.txt").write_text("2\n")
    git(repo, "commit", "-qam", "two")  # main: loose now, over its packed line
    git(repo, "tag", "-a", "v2", "-m", "annotated, loose")
    git(repo, "branch", "loose-only")
    return repo


def test_the_box_starts_with_the_refs_git_lists_read_without_git(make_repo, tmp_path, monkeypatch):
    repo = _rich_repo(make_repo, tmp_path)
    common = gitdir.common_dir(repo)
    assert (common / "packed-refs").exists() and (common / "refs" / "heads" / "main").exists()
    assert "refs/remotes/origin/HEAD" in git(repo, "for-each-ref", "--format=%(refname)")

    def no_git(*a, **k):
        raise AssertionError("git was asked")

    monkeypatch.setattr(gitdir.git, "out", no_git)
    snapshot = gitdir._refs_snapshot(repo, common)
    monkeypatch.undo()
    assert snapshot == _for_each_ref(repo)
    assert "wtbox/" not in snapshot and " refs/remotes/origin/HEAD\n" in snapshot


def test_git_is_asked_when_the_files_cannot_be_trusted(make_repo, tmp_path, monkeypatch):
    repo = _rich_repo(make_repo, tmp_path)
    common = gitdir.common_dir(repo)
    expected = _for_each_ref(repo)
    (common / "reftable").mkdir()  # a store of another format (git 2.45+): the reader knows only files
    assert gitdir.read_refs(common) is None
    assert gitdir._refs_snapshot(repo, common) == expected
    (common / "reftable").rmdir()

    (common / "refs" / "heads" / "odd").write_text("not an object id\n")
    assert gitdir.read_refs(common) is None
    (common / "refs" / "heads" / "odd").unlink()
    assert gitdir.read_refs(common) is not None


def test_refs_packed_while_they_are_read_send_the_reader_to_git(make_repo, tmp_path, monkeypatch):
    """`git pack-refs` (a gc) moves loose refs into packed-refs: read between the two, a ref is in
    neither; the reader sees packed-refs change and leaves the answer to git."""
    repo = _rich_repo(make_repo, tmp_path)
    common = gitdir.common_dir(repo)
    walk = os.walk

    def packing_walk(top, *a, **k):
        git(repo, "pack-refs", "--all")
        return walk(top, *a, **k)

    monkeypatch.setattr(gitdir.os, "walk", packing_walk)
    assert gitdir.read_refs(common) is None


def _tree(root):
    """Every path under `root` (relative) with its file's text, None for a directory."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_text() for p in sorted(root.rglob("*"))}


def test_a_git_dir_made_ahead_is_filled_to_what_a_fresh_one_holds_with_one_new_file(make_repo, tmp_path):
    """A spare sandbox's maker makes the box's git dir ahead (`prepare`: a new inode cost ~0.27 ms of CPU
    here); `make` and `worktree_add` then write into it. The result must be the fresh git dir's, byte
    for byte, and the only path they add the branch's own ref (its name is the box's)."""
    repo = make_repo({"a.txt": "1\n"})
    sha = git(repo, "rev-parse", "HEAD").strip()
    made = {}
    for how in ("fresh", "ahead"):
        box_dir = tmp_path / how
        git_dir, worktree = box_dir / "git", box_dir / "worktree"
        if how == "ahead":
            gitdir.prepare(git_dir, worktree)
            before = set(_tree(box_dir))
            assert before and all(v in (None, "") for v in _tree(box_dir).values())
        gitdir.make(repo, git_dir, sha)
        gitdir.worktree_add(git_dir, worktree, "wtbox/b-12345678", sha)
        made[how] = _tree(box_dir)
    fresh, ahead = made["fresh"], made["ahead"]
    assert ahead == {k: v.replace(str(tmp_path / "fresh"), str(tmp_path / "ahead")) if v else v
                     for k, v in fresh.items()}
    assert set(ahead) - before == {"git/refs/heads/wtbox/b-12345678"}
    # and git takes it as it takes a fresh one: the worktree is on the box's branch, at the base commit
    worktree = tmp_path / "ahead" / "worktree"
    assert git(worktree, "rev-parse", "--abbrev-ref", "HEAD").strip() == "wtbox/b-12345678"
    assert git(worktree, "rev-parse", "HEAD").strip() == sha.strip()
