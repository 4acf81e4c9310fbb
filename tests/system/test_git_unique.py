"""Which box branches hold commits no other branch has, for many branches in one go (gc's discovery
with hundreds of boxes ran one `git rev-list` per box: 1 s of a 1.5 s gc at 300 boxes)."""
from __future__ import annotations

from helpers import git

from worktreebox.system import git as G


def _commit(repo, name: str) -> None:
    (repo / f"{name}.txt").write_text(name)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", name)


def test_refs_with_unique_commits_agrees_with_one_check_per_branch(make_repo):
    repo = make_repo()
    git(repo, "branch", "wtbox/at-main")  # nothing of its own
    git(repo, "checkout", "-q", "-b", "wtbox/own")
    _commit(repo, "own")  # a commit only this branch has
    git(repo, "checkout", "-q", "-b", "wtbox/shares-a")
    git(repo, "checkout", "-q", "main")
    git(repo, "checkout", "-q", "-b", "wtbox/fork-a")
    _commit(repo, "shared")  # on fork-a and fork-b only: neither has it alone
    git(repo, "branch", "wtbox/fork-b")
    git(repo, "checkout", "-q", "-b", "wtbox/saved")
    _commit(repo, "saved")
    git(repo, "branch", "keep-saved")  # the user's own branch has it too
    git(repo, "checkout", "-q", "main")
    refs = ["wtbox/at-main", "wtbox/own", "wtbox/shares-a", "wtbox/fork-a", "wtbox/fork-b", "wtbox/saved"]
    one_by_one = {r for r in refs if G.unique_commits(repo, r)}
    assert one_by_one == set()  # own's commit is shares-a's too; fork-a and fork-b share theirs
    assert G.refs_with_unique_commits(repo, refs) == one_by_one
    git(repo, "branch", "-D", "wtbox/shares-a")
    git(repo, "branch", "-D", "wtbox/fork-b")
    refs = [r for r in refs if r not in ("wtbox/shares-a", "wtbox/fork-b")]
    one_by_one = {r for r in refs if G.unique_commits(repo, r)}
    assert one_by_one == {"wtbox/own"}  # (fork-a's commit is on keep-saved: saved was made from it)
    assert G.refs_with_unique_commits(repo, refs) == one_by_one
    assert G.refs_with_unique_commits(repo, []) == set()
