"""Copy-on-write worktrees: one pristine tree per commit, a view of it per box, every mount provider.

Real git, real overlayfs / fuse-overlayfs mounts (as root), real processes. The fallbacks are
forced with WTBOX_MOUNTS or `[host] mounts` and must behave the same as the default.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import CORE_TOML, git

from worktreebox.providers import mounts
from worktreebox.providers.mounts.base import mount_table, mounts_under, unmount_all


def _works(name: str, home: Path) -> str | None:
    """None when the provider works on this host, else why not (probed in a scratch home)."""
    try:
        mounts.choose(home, name, refresh=True)
        return None
    except Exception as e:
        return str(e)


PROVIDERS = ["overlay", "fuse-overlayfs", "reflink", "checkout"]


@pytest.fixture(params=PROVIDERS)
def provider(request, tmp_path, monkeypatch, wtbox_home):
    fs = None
    if request.param == "reflink" and _works("reflink", tmp_path / "probe-home"):
        fs = reflink_fs(tmp_path, wtbox_home)  # this disk cannot: a small XFS of our own can
    why = _works(request.param, (fs or tmp_path) / "probe-home")
    if why:
        pytest.skip(f"{request.param} does not work on this host: {why}")
    monkeypatch.setenv("WTBOX_MOUNTS", request.param)
    yield request.param
    if fs is not None:
        unmount_all(fs, include_root=True)


def reflink_fs(tmp_path: Path, where: Path) -> Path | None:
    """A loop-mounted XFS (reflink on) at `where`, or skip when this machine cannot make one."""
    import shutil

    if os.geteuid() != 0 or not shutil.which("mkfs.xfs"):
        pytest.skip("reflink needs a file system with reflink copies (here: root and mkfs.xfs for a loop XFS)")
    image = tmp_path / "xfs.img"
    with open(image, "wb") as f:
        f.truncate(400 * 1024 * 1024)
    where.mkdir(parents=True)
    for cmd in (["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], ["mount", "-o", "loop", str(image), str(where)]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot make a loop XFS here: {proc.stderr.strip()}")
    return where


def _new(run_wtbox, repo: Path, task: str, **kw) -> dict:
    return json.loads(run_wtbox("new", task, "--repo", str(repo), "--json", **kw).stdout)


def _trees(home: Path) -> list[str]:
    root = home / "trees"
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.exists() else []


def test_five_boxes_at_once_share_one_tree_and_keep_their_changes(provider, make_repo, run_wtbox, wtbox_home):
    repo = make_repo({"app.py": "VALUE = 1\n", "pkg/mod.py": "x = 1\n", "run.sh": "#!/bin/sh\necho run\n"},
                     toml=CORE_TOML)
    sha = git(repo, "rev-parse", "HEAD").strip()
    n = 5 if provider == "overlay" else 2  # the fallbacks behave the same with fewer boxes
    with ThreadPoolExecutor(n) as pool:
        boxes = list(pool.map(lambda i: _new(run_wtbox, repo, f"five-{i}"), range(n)))
    uses_tree = provider != "checkout"
    assert _trees(wtbox_home) == ([sha] if uses_tree else [])
    for b in boxes:
        wt = Path(b["path"])
        assert b["worktree"]["mount"] == provider
        assert (wt / "app.py").read_text() == "VALUE = 1\n"
        assert os.access(wt / "run.sh", os.X_OK)
        assert git(wt, "status", "--porcelain") == ""  # clean without checking a file out
        assert git(wt, "rev-parse", "--abbrev-ref", "HEAD").strip() == b["branch"]
        assert b["timings"]["tree"] >= 0
        if provider in ("overlay", "fuse-overlayfs"):
            assert any(m.target == str(wt) for m in mount_table())
            assert (Path(b["dir"]) / "upper" / ".git").is_file()  # the pointer lives in the box's own layer

    # edits and commits stay in their box
    a, b2 = Path(boxes[0]["path"]), Path(boxes[1]["path"])
    (a / "app.py").write_text("VALUE = 2\n")
    (a / "new.txt").write_text("only in a\n")
    assert (b2 / "app.py").read_text() == "VALUE = 1\n" and not (b2 / "new.txt").exists()
    if uses_tree:
        tree = wtbox_home / "trees" / sha / "tree"
        assert (tree / "app.py").read_text() == "VALUE = 1\n" and not (tree / "new.txt").exists()
    assert sorted(git(a, "status", "--porcelain").split("\n")[:-1]) == [" M app.py", "?? new.txt"]
    git(a, "add", "-A")
    git(a, "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qm", "box a")
    assert git(a, "status", "--porcelain") == ""
    # (a sandboxed box commits in a git dir of its own; its branch reaches the repository on pick or
    # rm --keep-branch: test_sandbox_git.py)
    assert git(a, "show", f"{boxes[0]['branch']}:app.py") == "VALUE = 2\n"
    assert git(b2, "status", "--porcelain") == ""
    diff = git(a, "diff", "--stat", sha, boxes[0]["branch"])
    assert "app.py" in diff and "new.txt" in diff

    # rm's unsaved-work check sees edits made through the view
    (b2 / "pkg" / "mod.py").write_text("x = 2\n")
    proc = run_wtbox("rm", boxes[1]["id"], check=False)
    assert proc.returncode == 1 and "uncommitted" in proc.stderr
    proc = run_wtbox("rm", boxes[0]["id"], check=False)
    assert proc.returncode == 1 and "no other branch" in proc.stderr

    status = json.loads(run_wtbox("status", boxes[0]["id"], "--json").stdout)
    assert status["disk_bytes"] >= status["worktree_bytes"] > 0
    if uses_tree and provider != "reflink":
        # the box's own disk is its changes (app.py, new.txt, git's pointer), not the shared tree
        assert status["worktree_bytes"] < 100_000

    run_wtbox("rm", "--all", "--yes", "--force")
    assert mounts_under(wtbox_home) == []
    assert not any((wtbox_home / "boxes").iterdir())
    assert git(repo, "branch", "--list", "wtbox/*") == ""
    assert str(wtbox_home / "boxes") not in git(repo, "worktree", "list")
    # the tree outlives its boxes until gc finds it unused for [host] layer_ttl
    assert _trees(wtbox_home) == ([sha] if uses_tree else [])
    run_wtbox("gc", "--grace", "0")
    assert _trees(wtbox_home) == ([sha] if uses_tree else [])
    out = json.loads(run_wtbox("gc", "--grace", "0", "--json", env={"WTBOX_LAYER_TTL": "0"}).stdout)
    assert _trees(wtbox_home) == []
    assert out["layers"] == ([f"trees/{sha}"] if uses_tree else [])


def test_host_setting_forces_the_fallback_and_a_provider_that_cannot_work_is_refused(make_repo, run_wtbox,
                                                                                     wtbox_home, monkeypatch):
    monkeypatch.delenv("WTBOX_MOUNTS", raising=False)
    repo = make_repo(toml=CORE_TOML)
    wtbox_home.mkdir(parents=True)
    (wtbox_home / "config.toml").write_text('[host]\nmounts = "checkout"\n')
    box = _new(run_wtbox, repo, "plain")
    assert box["worktree"] == {"mount": "checkout"}
    assert not any(m.target == box["path"] for m in mount_table())
    assert _trees(wtbox_home) == []
    run_wtbox("rm", box["id"])

    (wtbox_home / "config.toml").write_text('[host]\nmounts = "zfs"\n')
    proc = run_wtbox("new", "bad", "--repo", str(repo), check=False)
    assert proc.returncode == 2 and "[host] mounts" in proc.stderr and "overlay" in proc.stderr
    assert "Traceback" not in proc.stderr
    (wtbox_home / "config.toml").unlink()
    if _works("reflink", wtbox_home / "probe") is not None:
        proc = run_wtbox("new", "bad", "--repo", str(repo), check=False, env={"WTBOX_MOUNTS": "reflink"})
        assert proc.returncode == 2 and "WTBOX_MOUNTS" in proc.stderr and "reflink" in proc.stderr
        assert json.loads(run_wtbox("ls", "--json").stdout) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="overlayfs needs root")
def test_doctor_names_the_provider_and_why(run_wtbox, wtbox_home):
    out = json.loads(run_wtbox("doctor", "--json", check=False).stdout)
    assert out["mounts"]["provider"] == "overlay"
    assert out["mounts"]["probes"]["overlay"] == "works"
    check = next(c for c in out["checks"] if c["check"] == "mounts")
    assert check["ok"] and "overlay" in check["detail"]
    out = json.loads(run_wtbox("doctor", "--json", check=False, env={"WTBOX_MOUNTS": "fuse-overlayfs"}).stdout)
    assert out["mounts"]["provider"] == "fuse-overlayfs" and "WTBOX_MOUNTS" in out["mounts"]["why"]
    assert not list(wtbox_home.glob(".probe-*"))  # probes clean up after themselves


@pytest.mark.skipif(os.geteuid() != 0, reason="overlayfs needs root")
def test_gc_cleans_orphan_mounts_probes_and_half_built_trees_but_not_a_tree_in_use(make_repo, run_wtbox, wtbox_home):
    repo = make_repo(toml=CORE_TOML)
    sha = git(repo, "rev-parse", "HEAD").strip()
    live = _new(run_wtbox, repo, "live")
    orphan = _new(run_wtbox, repo, "orphan")
    # the orphan's row vanishes (a crash between mount and registry write looks the same to gc)
    import sqlite3

    db = sqlite3.connect(wtbox_home / "registry.sqlite3")
    db.execute("DELETE FROM boxes WHERE id = ?", (orphan["id"],))
    db.commit()
    db.close()
    # a probe mount and a half-built tree whose processes were killed
    probe = wtbox_home / ".probe-999999-overlay-abcdef"
    for d in ("lower", "upper", "work", "target"):
        (probe / d).mkdir(parents=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={probe}/lower,upperdir={probe}/upper,workdir={probe}/work", str(probe / "target")],
                   check=True)
    half = wtbox_home / "trees" / f".tmp-{'0' * 40}-1234abcd"
    (half / "tree").mkdir(parents=True)

    doctor = json.loads(run_wtbox("doctor", "--json", check=False).stdout)
    assert orphan["id"] in doctor["orphans"]
    assert str(probe / "target") in doctor["stray_mounts"]
    assert any(t.endswith(orphan["id"] + "/worktree") for t in doctor["stray_mounts"])

    out = json.loads(run_wtbox("gc", "--grace", "0", "--json", env={"WTBOX_LAYER_TTL": "0"}).stdout)
    assert {a["id"] for a in out["actions"]} == {orphan["id"]}
    # (boxes/ itself is a mount while sandboxed boxes live: their views reach their holders through it)
    assert [m.target for m in mounts_under(wtbox_home) if m.target != str(wtbox_home / "boxes")] == [live["path"]]
    assert not probe.exists() and not half.exists()
    assert _trees(wtbox_home) == [sha]  # the live box's tree stays, however old
    assert git(Path(live["path"]), "status", "--porcelain") == ""


@pytest.mark.skipif(os.geteuid() != 0, reason="overlayfs needs root")
def test_a_box_whose_view_is_gone_is_mounted_again_with_its_changes(make_repo, run_wtbox, wtbox_home):
    """After a reboot the mounts are gone but upper/ still holds the box's work."""
    repo = make_repo({"app.py": "VALUE = 1\n"}, toml=CORE_TOML)
    box = _new(run_wtbox, repo, "reboot")
    wt = Path(box["path"])
    (wt / "app.py").write_text("VALUE = 2\n")
    unmount_all(box["dir"])
    assert not (wt / "app.py").exists()
    proc = run_wtbox("exec", box["id"], "--", "cat", "app.py")
    assert proc.stdout == "VALUE = 2\n"
    assert git(wt, "status", "--porcelain") == " M app.py\n"
    run_wtbox("rm", "--force", box["id"])
    assert mounts_under(wtbox_home) == []


def test_tree_is_built_once_for_concurrent_users_and_a_failed_build_leaves_nothing(tmp_path):
    from worktreebox.layers.store import LayerStore

    store = LayerStore(tmp_path / "store")
    builds = []

    def build(tmp: Path) -> None:
        builds.append(tmp)
        time.sleep(0.3)
        (tmp / "done").write_text("ok")

    def user(_):
        with store.use("k1", build) as (path, _built):
            return (path / "done").read_text()

    with ThreadPoolExecutor(5) as pool:
        assert list(pool.map(user, range(5))) == ["ok"] * 5
    assert len(builds) == 1

    def broken(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError), store.use("k2", broken):
        pass
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [".locks", "k1"]
    # a holder of the entry keeps gc away from it, however old it is
    held = threading.Event()
    release = threading.Event()

    def hold():
        with store.use("k1", build):
            held.set()
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(5)
    assert store.sweep(set(), ttl=-1) == []
    release.set()
    t.join()
    assert store.sweep(set(), ttl=-1) == ["k1"]
    assert store.keys() == []


def test_tree_of_a_killed_builder_is_swept_and_rebuilt(make_repo, tmp_path):
    """kill -9 in the middle of checking a tree out: the temp dir stays, no lock; gc removes it."""
    from worktreebox.layers import trees

    repo = make_repo({f"d{i}/f{j}.txt": "x" * 2000 for i in range(30) for j in range(30)})
    sha = git(repo, "rev-parse", "HEAD").strip()
    home = tmp_path / "h"
    code = ("import sys, time; from pathlib import Path; from worktreebox.layers import trees\n"
            "def slow(repo, sha, dest):\n"
            "    (dest / 'tree').mkdir(); print('building', flush=True); time.sleep(30)\n"
            "trees.build = slow\n"
            "with trees.use(Path(sys.argv[1]), sys.argv[2], sys.argv[3]): pass\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(home), str(repo), sha], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "building"
    p.kill()
    p.wait()
    assert [x.name for x in (home / "trees").iterdir() if x.name.startswith(".tmp-")]
    assert trees.store(home).sweep(set(), ttl=3600) and trees.store(home).keys() == []
    assert not [x for x in (home / "trees").iterdir() if x.name.startswith(".tmp-")]
    with trees.use(home, repo, sha) as (path, built):
        assert built and (path / "tree" / "d3" / "f4.txt").read_text() == "x" * 2000


@pytest.mark.skipif(os.geteuid() != 0, reason="overlayfs needs root")
def test_rm_from_a_shell_inside_the_box_detaches_the_busy_view(make_repo, run_wtbox, wtbox_home):
    """`wtbox rm` run from inside the worktree: its own cwd keeps the mount busy, so it is detached lazily."""
    repo = make_repo(toml=CORE_TOML)
    box = _new(run_wtbox, repo, "inside")
    run_wtbox("rm", "--force", box["id"], cwd=box["path"])
    assert mounts_under(wtbox_home) == []
    assert not Path(box["dir"]).exists()
    assert git(repo, "branch", "--list", "wtbox/*") == ""


@pytest.mark.skipif(os.geteuid() != 0, reason="overlayfs needs root")
def test_unsaved_work_check_sees_changes_the_upper_layer_does_not_hold(make_repo, run_wtbox, wtbox_home):
    """rm skips `git status` for a view nobody touched; index-only changes and commits still count."""
    repo = make_repo({"app.py": "VALUE = 1\n"}, toml=CORE_TOML)
    staged, committed, touched, fresh = (_new(run_wtbox, repo, n) for n in ("staged", "committed", "touched", "fresh"))
    git(Path(staged["path"]), "rm", "-q", "--cached", "app.py")  # changes the index, not a file
    git(Path(committed["path"]), "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-q", "--allow-empty",
        "-m", "x")
    os.utime(Path(touched["path"]) / "app.py")  # copied up, content unchanged: git finds nothing
    proc = run_wtbox("rm", staged["id"], check=False)
    assert proc.returncode == 1 and "uncommitted" in proc.stderr
    proc = run_wtbox("rm", committed["id"], check=False)
    assert proc.returncode == 1 and "no other branch" in proc.stderr
    run_wtbox("rm", touched["id"])
    run_wtbox("rm", fresh["id"])
    assert {b["id"] for b in json.loads(run_wtbox("ls", "--json").stdout)} == {staged["id"], committed["id"]}
    run_wtbox("rm", "--all", "--yes", "--force")
