"""[box] disk_max (resources/disk.py): a real write past the limit, against a real loop-mounted filesystem."""
from __future__ import annotations

import json
import subprocess

import pytest
from helpers import CORE_TOML

from worktreebox.providers.mounts.base import mounts_under
from worktreebox.resources import disk

LIMIT = '[box]\ndisk_max = "24M"\n'


@pytest.fixture
def enforced(host):
    how, why = disk.mode(host)
    if how != disk.IMAGE:
        pytest.skip(f"disk_max cannot be enforced here: {why}")


def test_a_write_past_disk_max_fails_in_the_box_and_the_host_keeps_its_disk(host, make_repo, enforced, run_wtbox):
    """Defect 4: a box wrote 2 GB into its TMPDIR unimpeded."""
    repo = make_repo(toml=CORE_TOML + LIMIT)
    box = host.new("full", repo=repo)
    out = json.loads(run_wtbox("status", box.id, "--json").stdout)
    assert out["disk"]["max_bytes"] == 24 << 20 and out["disk"]["enforced"]
    write = run_wtbox("exec", box.id, "--", "sh", "-c", 'dd if=/dev/zero of="$TMPDIR/big" bs=1M count=200',
                      check=False)
    assert write.returncode != 0 and "No space left on device" in write.stderr
    assert (box.tmp_dir / "big").stat().st_size < 24 << 20
    # the worktree's own changes count too (the overlay's upper layer is inside the limit)
    proc = subprocess.run(["dd", "if=/dev/zero", f"of={box.path / 'blob'}", "bs=1M", "count=50"], capture_output=True,
                          text=True)
    assert proc.returncode != 0 and "No space left" in proc.stderr
    image = disk.image_of(host, box)
    assert image.stat().st_blocks * 512 <= 26 << 20  # sparse: what was written, at most the limit
    host.rm(box.id, force=True)
    assert not image.exists() and not box.dir.exists()


def test_a_box_without_disk_max_has_no_image_and_doctor_says_how(host, make_repo, run_wtbox):
    box = host.new("free", repo=make_repo(toml=CORE_TOML))
    assert "disk" not in box.data and not disk.image_of(host, box).exists()
    assert "disk_max" in run_wtbox("doctor").stdout


def test_gc_after_a_kill_removes_the_image_and_its_mount(host, make_repo, enforced):
    from worktreebox.fleet import gc

    box = host.new("orphan", repo=make_repo(toml=CORE_TOML + LIMIT))
    host.registry.delete_box(box.id)  # as if `new` had been killed after making it
    gc.run(host, grace=0)
    assert not disk.image_of(host, box).exists() and not box.dir.exists()


def test_a_pooled_box_with_disk_max_is_claimed_with_its_limit(host, make_repo, enforced, run_wtbox):
    from worktreebox.fleet import pool as P

    repo = make_repo(toml=CORE_TOML + LIMIT)
    P.top_up(host, P.resolve_target(repo), 1)
    made = run_wtbox("new", "claimed", "--json", cwd=repo)
    out = json.loads(made.stdout)
    # In a sandboxed home boxes/ is a shared mount, where the kernel refuses to move the pooled box's
    # disk to its new name (EINVAL): it is bound there too (mounts.move_mount), and the claim holds.
    assert out["from_pool"], (out.get("pool"), made.stderr)
    assert out["disk"]["enforced"]
    assert run_wtbox("exec", out["id"], "--", "git", "status", "--porcelain").stdout == ""  # its view, inside
    write = run_wtbox("exec", out["id"], "--", "sh", "-c", 'dd if=/dev/zero of="$TMPDIR/big" bs=1M count=200',
                      check=False)
    assert "No space left on device" in write.stderr
    run_wtbox("rm", "--force", out["id"])
    assert not list((host.home / "disks").glob("*.img"))
    assert [m.target for m in mounts_under(host.home / "boxes")] == []
    assert not [p.name for p in (host.home / "boxes").iterdir()]
    assert "pool-" not in run_wtbox("gc", "--dry-run", "--json").stdout


def test_where_no_filesystem_enforces_it_disk_max_is_watched_and_the_box_frozen(make_repo, run_wtbox, monkeypatch,
                                                                                 wtbox_home):
    """WTBOX_DISK_WATCH=1 (what a host without root or loop devices gets): a service that keeps writing is
    frozen past the limit, the box says why, and it goes on once files are deleted from it."""
    import time
    from pathlib import Path

    from helpers import wait_for

    from worktreebox.system import cgroups

    if cgroups.for_home(wtbox_home) is None:
        pytest.skip("no cgroups here: nothing to freeze")
    monkeypatch.setenv("WTBOX_DISK_WATCH", "1")
    writer = 'while true; do head -c 1048576 /dev/zero >> \\"$TMPDIR/fill\\"; sleep 0.05; done'
    repo = make_repo(toml=CORE_TOML + LIMIT + f'[services.writer]\ncmd = "{writer}"\n')
    out = json.loads(run_wtbox("new", "watched", "--json", cwd=repo).stdout)
    assert out["disk"] == {"max_bytes": 24 << 20, "enforced": False}
    fill = Path(out["dir"]) / "tmp" / "fill"
    def degraded() -> dict | None:
        s = json.loads(run_wtbox("status", out["id"], "--json").stdout)
        return s if s["state"] == "degraded" else None

    status = wait_for(degraded, timeout=30)
    assert status and "disk_max" in status["reason"]
    size = fill.stat().st_size
    time.sleep(1.0)
    assert fill.stat().st_size == size  # frozen: no more writes
    errors = run_wtbox("logs", out["id"], "--level", "error").stdout
    assert "past its disk_max of 24.0 MiB" in errors
    fill.unlink()  # room again, from outside the box
    assert wait_for(lambda: json.loads(run_wtbox("status", out["id"], "--json").stdout)["state"] == "ready", timeout=30)
    assert wait_for(fill.exists, timeout=10)  # it writes again
    run_wtbox("rm", "--force", out["id"])
