"""gc: orphans, TTL, keep, unsaved-work protection, dry-run, grace window, concurrency."""
from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import CORE_TOML, git

from worktreebox.errors import WtboxError
from worktreebox.fleet import gc as gc_mod


def _age(home: Path, box_id: str, *, last_used: float | None = None, updated: float | None = None,
         state: str | None = None) -> None:
    db = sqlite3.connect(home / "registry.sqlite3")
    if last_used is not None:
        db.execute("UPDATE boxes SET last_used_at=? WHERE id=?", (last_used, box_id))
    if updated is not None:
        db.execute("UPDATE boxes SET updated_at=? WHERE id=?", (updated, box_id))
    if state is not None:
        db.execute("UPDATE boxes SET state=? WHERE id=?", (state, box_id))
    db.commit()
    db.close()


def _forget_creator(home: Path, box_id: str) -> None:
    db = sqlite3.connect(home / "registry.sqlite3")
    row = db.execute("SELECT data FROM boxes WHERE id=?", (box_id,)).fetchone()
    data = json.loads(row[0])
    data.pop("creator", None)
    db.execute("UPDATE boxes SET data=? WHERE id=?", (json.dumps(data), box_id))
    db.commit()
    db.close()


def test_orphans_are_removed_and_dry_run_changes_nothing(host, make_repo, run_wtbox, wtbox_home):
    repo = make_repo(toml=CORE_TOML)
    box = host.new("orphan", repo=repo)
    # the registry forgets the box (as if its row was lost): worktree, branch, dir, lease remain
    db = sqlite3.connect(wtbox_home / "registry.sqlite3")
    db.execute("DELETE FROM boxes WHERE id=?", (box.id,))
    db.commit()
    db.close()
    dry = json.loads(run_wtbox("gc", "--dry-run", "--json").stdout)
    assert [a["id"] for a in dry["actions"]] == [box.id] and "orphan" in dry["actions"][0]["reason"]
    assert box.path.exists() and f"wtbox/{box.id}" in git(repo, "branch", "--list")
    out = json.loads(run_wtbox("gc", "--json").stdout)
    assert out["actions"][0]["done"] is True
    assert not box.dir.exists()
    assert git(repo, "branch", "--list", "wtbox/*") == ""
    assert box.id not in git(repo, "worktree", "list")
    # The box's leases are gone; the router keeps its host-level port, and stopped: no box needs it.
    assert host.registry.lease_owners() == {"@router"} and out["router"] == {"running": False, "routes": 0}
    assert json.loads(run_wtbox("gc", "--json").stdout)["actions"] == []


def test_ttl_expiry_keep_and_unsaved_work(host, make_repo, run_wtbox, wtbox_home):
    repo = make_repo(toml=CORE_TOML)
    old = time.time() - 10 * 86400
    expired = host.new("expired", repo=repo, ttl="1h")
    kept = host.new("kept", repo=repo, ttl="1h", keep=True)
    later_kept = host.new("later-kept", repo=repo, ttl="1h")
    unsaved = host.new("unsaved", repo=repo, ttl="1h")
    fresh = host.new("fresh", repo=repo, ttl="1h")
    (unsaved.path / "work.txt").write_text("precious")
    for b in (expired, kept, later_kept, unsaved):
        _age(wtbox_home, b.id, last_used=old)
    run_wtbox("keep", later_kept.id)
    out = json.loads(run_wtbox("gc", "--json").stdout)
    by_id = {a["id"]: a for a in out["actions"]}
    assert set(by_id) == {expired.id, unsaved.id}
    assert by_id[expired.id]["action"] == "remove"
    assert by_id[unsaved.id]["action"] == "expire" and "uncommitted" in by_id[unsaved.id]["reason"]
    left = {b.id: b for b in host.list()}
    assert expired.id not in left and not expired.dir.exists()
    assert left[unsaved.id].state == "expired" and (unsaved.path / "work.txt").read_text() == "precious"
    assert {kept.id, later_kept.id, fresh.id} <= set(left)
    # unkeep makes it eligible again
    run_wtbox("unkeep", later_kept.id)
    out = json.loads(run_wtbox("gc", "--json").stdout)
    assert later_kept.id in {a["id"] for a in out["actions"] if a["action"] == "remove"}


def test_grace_window_and_live_creator(host, make_repo, run_wtbox, wtbox_home):
    repo = make_repo(toml=CORE_TOML)
    b = host.new("stuck", repo=repo)
    _age(wtbox_home, b.id, state="creating")
    # the creating process (this test) is alive: gc leaves it alone even with --grace 0
    assert json.loads(run_wtbox("gc", "--grace", "0", "--json").stdout)["actions"] == []
    _forget_creator(wtbox_home, b.id)
    # creator gone but the row is younger than the grace window: still left alone
    assert json.loads(run_wtbox("gc", "--json").stdout)["actions"] == []
    _age(wtbox_home, b.id, updated=time.time() - 3600)
    out = json.loads(run_wtbox("gc", "--json").stdout)
    assert [a["id"] for a in out["actions"]] == [b.id] and "creating" in out["actions"][0]["reason"]
    assert host.list() == [] and not b.dir.exists()


def test_rm_is_restartable_after_a_crash_mid_removal(host, make_repo, run_wtbox, wtbox_home):
    repo = make_repo(toml=CORE_TOML)
    b = host.new("halfgone", repo=repo)
    _age(wtbox_home, b.id, state="removing")
    # rm died after taking the box's files away, before the branch and the row
    from worktreebox.providers.mounts.base import unmount_all

    if unmount_all(b.dir):  # a copy-on-write worktree: its files are the upper layer
        shutil.rmtree(b.dir / "upper")
    else:
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(b.path)], check=True)
    run_wtbox("rm", b.id)
    assert host.list() == [] and not b.dir.exists()
    assert git(repo, "branch", "--list", "wtbox/*") == ""


def test_two_gc_runs_do_not_race(host, make_repo, run_wtbox, wtbox_home):
    repo = make_repo(toml=CORE_TOML)
    boxes = [host.new(f"g{i}", repo=repo, ttl="1h") for i in range(4)]
    for b in boxes:
        _age(wtbox_home, b.id, last_used=time.time() - 7200)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: run_wtbox("gc", "--json", check=False), range(2)))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    removed = [a["id"] for r in results for a in json.loads(r.stdout)["actions"]]
    assert sorted(removed) == sorted(b.id for b in boxes)  # each box removed exactly once
    assert host.list() == []
    # while one gc holds the lock, another one gives up with one sentence
    with gc_mod.exclusive_lock(host, wait=1) as locked:
        assert locked
        with pytest.raises(WtboxError, match="Another 'wtbox gc'"):
            gc_mod.run(host, wait=0.2)


def test_timer_templates_print(run_wtbox):
    out = run_wtbox("gc", "--install-timer", "--print").stdout
    assert "[Timer]" in out and "OnUnitActiveSec=1h" in out and " gc" in out and "* * *" in out


def test_kept_branch_with_unique_commits_is_not_an_orphan(host, make_repo, run_wtbox):
    repo = make_repo(toml=CORE_TOML)
    box = host.new("keepbranch", repo=repo)
    (box.path / "f.txt").write_text("work")
    git(box.path, "add", "f.txt")
    git(box.path, "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qm", "work")
    run_wtbox("rm", "--force", "--keep-branch", box.id)
    assert f"wtbox/{box.id}" in git(repo, "branch", "--list")
    out = json.loads(run_wtbox("gc", "--grace", "0", "--json").stdout)
    assert out["actions"] == []
    assert f"wtbox/{box.id}" in git(repo, "branch", "--list")  # the only copy of that commit survives


def test_gc_empties_trash_left_by_a_dead_background_delete(host, make_repo, run_wtbox, wtbox_home):
    stale = wtbox_home / "trash" / "dead-12345678-abcdef"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "file").write_text("x")
    run_wtbox("gc")
    assert not stale.exists()


def test_a_gc_of_another_home_in_the_middle_of_new_leaves_the_new_box_whole(host, make_repo, tmp_path, monkeypatch):
    """Seen once: `new` failed with FileNotFoundError .git/worktrees/... while a gc ran. A gc (of any home
    that knows the repo) runs `git worktree prune`, which deleted the admin dir of a worktree whose `.git`
    pointer `new` had just taken out to mount the box's view over it. Here that gc runs at that moment."""
    from worktreebox.host import Host
    from worktreebox.providers import mounts

    repo = make_repo(toml=CORE_TOML)
    other = Host(tmp_path / "other-home")
    other.registry.remember_repo(str(repo))  # the other home made boxes of this repo once
    provider = mounts.for_host(host)
    if not provider.mounts:
        pytest.skip(f"the {provider.name} provider mounts no view: no window with the pointer taken out")
    real = type(provider).attach
    ran = []

    def attach_during_gc(self, lower, target, scratch):
        ran.append(gc_mod.run(other, grace=0))
        return real(self, lower, target, scratch)

    monkeypatch.setattr(type(provider), "attach", attach_during_gc)
    box = host.new("raced", repo=repo)
    assert ran and git(box.path, "status", "--porcelain") == ""
    own_git = (box.data.get("sandbox") or {}).get("provider") not in (None, "off")  # its worktree in its git dir
    assert git(repo, "worktree", "list").count(str(box.path)) == (0 if own_git else 1)
    host.rm(box.id)
    assert not (repo / ".git" / "worktrees").exists() or not list((repo / ".git" / "worktrees").iterdir())
    other.registry.close()
