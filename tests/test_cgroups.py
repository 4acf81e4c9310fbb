"""Per-box cgroups on the real kernel: membership, limits, exact teardown, OOM, accounting.

The module tests talk to /sys/fs/cgroup directly; the box tests run real boxes through the CLI.
This machine has cgroup v1; the v2 backend is exercised on the cgroup2 mount that hybrid
hosts have at /sys/fs/cgroup/unified (membership, kill, removal: no controllers there), and
in full where /sys/fs/cgroup itself is cgroup2.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import wait_for
from worktreebox import cgroups

PY = sys.executable
HOST_CGROUPS, WHY_NOT = cgroups.detect("probe")
needs_cgroups = pytest.mark.skipif(HOST_CGROUPS is None, reason=f"no cgroups here: {WHY_NOT}")
UNIFIED = Path("/sys/fs/cgroup/unified")
V2_FULL = (cgroups.CGROUP_FS / "cgroup.controllers").exists()


@pytest.fixture
def cg(tmp_path):
    """The real backend of this host for a private home; every box cgroup it made is removed after."""
    backend, why = cgroups.detect(cgroups.home_key(tmp_path / "home"))
    if backend is None:
        pytest.skip(f"no cgroups here: {why}")
    yield backend
    for box_id in backend.box_ids():
        backend.remove(box_id)


def in_cgroup(pid: int, rel: str) -> bool:
    """/proc/<pid>/cgroup puts the process at `rel` in every hierarchy wtbox uses."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    ours = [line for line in lines if line.split(":", 2)[2].startswith("/wtbox")]
    return bool(ours) and all(line.split(":", 2)[2] == rel for line in ours)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


ESCAPE = ("import os, sys, time\n"
          "if os.fork(): sys.exit(0)\n"
          "os.setsid()\n"
          "if os.fork(): sys.exit(0)\n"
          "open(sys.argv[1], 'w').write(str(os.getpid()))\n"
          "os.chdir('/')\n"
          "time.sleep(300)\n")


# ---------------------------------------------------------------- the module, on this host's backend

@needs_cgroups
def test_box_cgroup_membership_limits_and_exact_kill(cg, tmp_path):
    cg.create("t-00000001", cgroups.Limits(cpu_weight=50, memory_max=256 << 20, pids_max=200))
    limits = cg.limits("t-00000001")
    assert limits.memory_max == 256 << 20 and limits.pids_max == 200
    assert limits.cpu_weight == 50 or "cpu" in cg.missing
    pidfile = tmp_path / "daemon.pid"
    # The child enters the leaf before exec; the daemon it double-forks (own session, env -i, cwd /)
    # stays in it: a cgroup cannot be left by forking.
    child = subprocess.Popen(["env", "-i", PY, "-c", ESCAPE, str(pidfile)],
                             preexec_fn=cg.placer("t-00000001", "web"), start_new_session=True)
    assert child.wait(10) == 0
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    daemon = int(pidfile.read_text())
    assert in_cgroup(daemon, cg.relative("t-00000001", "web"))
    assert wait_for(lambda: cg.pids("t-00000001") == {daemon})  # the middle process of the double fork exits
    assert cg.pids("t-00000001", "web") == {daemon}
    assert "t-00000001" in cg.box_ids() and cg.leaves("t-00000001") == ["web"]

    assert cg.kill("t-00000001") == {daemon}
    assert not alive(daemon) and cg.pids("t-00000001") == set()
    cg.remove("t-00000001")
    assert not cg.exists("t-00000001") and "t-00000001" not in cg.box_ids()
    assert all(not d.exists() for d in cg.box_dirs("t-00000001"))
    cg.remove("t-00000001")  # idempotent


@needs_cgroups
def test_a_fork_storm_is_killed_whole(cg):
    """Processes that keep forking cannot outrun the kill (v1: freezer; v2: cgroup.kill)."""
    cg.create("t-00000002", cgroups.Limits(pids_max=300))
    storm = "import os, time\nwhile True:\n    try:\n        os.fork() or time.sleep(0.05)\n    except OSError:\n        time.sleep(0.01)\n"
    subprocess.Popen([PY, "-c", storm], preexec_fn=cg.placer("t-00000002", "storm"), start_new_session=True)
    deadline = time.monotonic() + 10
    while len(cg.pids("t-00000002")) < 20:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    killed = cg.kill("t-00000002")
    assert len(killed) >= 20 and cg.pids("t-00000002") == set()
    cg.remove("t-00000002")
    assert not cg.exists("t-00000002")


@needs_cgroups
def test_kill_spares_the_caller_and_one_leaf_alone(cg):
    """`wtbox rm` typed in `wtbox shell` must not kill that shell; `down web` leaves the other leaves."""
    cg.create("t-00000003", cgroups.Limits())
    shell = subprocess.Popen(["sleep", "300"], preexec_fn=cg.placer("t-00000003", cgroups.EXEC))
    web = subprocess.Popen(["sleep", "300"], preexec_fn=cg.placer("t-00000003", "web"))
    worker = subprocess.Popen(["sleep", "300"], preexec_fn=cg.placer("t-00000003", "worker"))
    try:
        assert cg.kill("t-00000003", "web") == {web.pid}
        assert web.wait(5) == -signal.SIGKILL and worker.poll() is None
        assert cg.kill("t-00000003", spare={shell.pid}) == {worker.pid}
        assert worker.wait(5) == -signal.SIGKILL
        assert shell.poll() is None and shell.pid not in cg.pids("t-00000003")
        cg.remove("t-00000003")
        assert not cg.exists("t-00000003")
    finally:
        for p in (shell, web, worker):
            p.kill()
            p.wait()


@needs_cgroups
def test_homes_do_not_see_each_others_boxes(tmp_path):
    a, _ = cgroups.detect(cgroups.home_key(tmp_path / "a"))
    b, _ = cgroups.detect(cgroups.home_key(tmp_path / "b"))
    try:
        a.create("t-0000000a", cgroups.Limits())
        b.create("t-0000000b", cgroups.Limits())
        assert a.box_ids() == {"t-0000000a"} and b.box_ids() == {"t-0000000b"}
        a.remove("t-0000000b")  # not a's: nothing to do
        assert b.exists("t-0000000b")
    finally:
        a.remove("t-0000000a")
        b.remove("t-0000000b")


@needs_cgroups
def test_memory_limit_kills_inside_the_box_and_is_counted(cg):
    if "memory" in cg.missing:
        pytest.skip("no memory controller on this host")
    cg.create("t-00000004", cgroups.Limits(memory_max=48 << 20))
    hog = subprocess.Popen([PY, "-c", "x = []\nwhile True: x.append(bytearray(1 << 20))"],
                           preexec_fn=cg.placer("t-00000004", "hog"))
    assert hog.wait(30) == -signal.SIGKILL
    assert cg.oom_kills("t-00000004") == {"hog": 1}
    usage = cg.usage("t-00000004")
    assert usage.memory_peak_bytes is None or 40 << 20 <= usage.memory_peak_bytes <= 48 << 20
    if os.access("/dev/kmsg", os.R_OK):
        victims = cgroups.oom_victims(cg.relative("t-00000004"))
        assert [(v["leaf"], v["pid"]) for v in victims] == [("hog", hog.pid)]
        assert victims[0]["task"].startswith("python")
        assert cgroups.oom_victims(cg.relative("t-00000004"), after_seq=victims[0]["seq"]) == []


@needs_cgroups
def test_usage_counts_cpu_and_pids(cg):
    cg.create("t-00000005", cgroups.Limits())
    burn = subprocess.Popen([PY, "-c", "import sys, time\nwhile time.process_time() < 0.3: pass\n"
                             "print(flush=True)\ntime.sleep(30)"], stdout=subprocess.PIPE,
                            preexec_fn=cg.placer("t-00000005", "burn"))
    try:
        burn.stdout.readline()  # it has used 0.3 s of CPU
        usage = cg.usage("t-00000005")
        assert usage.cpu_seconds >= 0.25 and usage.pids == 1
        assert usage.memory_bytes is None or usage.memory_bytes > 1 << 20
    finally:
        burn.kill()
        burn.wait()


def test_detection_reads_the_mounts():
    """Which backend a host gets, from its mount table (pure logic over mountinfo lines)."""
    hybrid = ("32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
              "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
              "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n")
    backend, why = cgroups.detect("k", hybrid)
    if os.geteuid() == 0 and os.access("/sys/fs/cgroup/memory", os.W_OK):
        assert isinstance(backend, cgroups.CgroupsV1) and why is None
    else:
        assert backend is None and "not writable" in why
    assert cgroups.detect("k", "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n") == (
        None, "no cgroup filesystem is mounted at /sys/fs/cgroup")
    unified = "30 23 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n"
    backend, why = cgroups.detect("k", unified)
    assert isinstance(backend, cgroups.CgroupsV2) or "delegated" in why


def test_turned_off_by_environment(monkeypatch):
    monkeypatch.setenv("WTBOX_CGROUPS", "off")
    assert cgroups.detect("k") == (None, "cgroups are turned off by WTBOX_CGROUPS=off")


# ---------------------------------------------------------------- the v2 backend

@pytest.mark.skipif(V2_FULL or not os.access(UNIFIED / "cgroup.procs", os.W_OK),
                    reason="no writable cgroup2 mount at /sys/fs/cgroup/unified (not a hybrid cgroup v1 host)")
def test_v2_backend_on_the_hybrid_unified_mount(tmp_path):
    """The v2 code paths that need no controllers: subtree layout, placement, cgroup.kill, removal."""
    base = UNIFIED / f"wtbox-test-{os.getpid()}"
    cg = cgroups.CgroupsV2(base, "k", outside=UNIFIED, mount=UNIFIED)
    try:
        cg.create("t-00000006", cgroups.Limits(cpu_weight=50))  # limits without controllers: not applied
        pidfile = tmp_path / "daemon.pid"
        child = subprocess.Popen(["env", "-i", PY, "-c", ESCAPE, str(pidfile)],
                                 preexec_fn=cg.placer("t-00000006", "web"), start_new_session=True)
        assert child.wait(10) == 0
        deadline = time.monotonic() + 10
        while not pidfile.exists() or not pidfile.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        daemon = int(pidfile.read_text())
        line = next(x for x in Path(f"/proc/{daemon}/cgroup").read_text().splitlines() if x.startswith("0::"))
        assert line[3:] == cg.relative("t-00000006", "web") == f"/{base.name}/k/t-00000006/web"
        assert wait_for(lambda: cg.pids("t-00000006") == {daemon}) and cg.box_ids() == {"t-00000006"}
        assert cg.usage("t-00000006").pids == 1
        assert cg.kill("t-00000006") == {daemon} and not alive(daemon)
        cg.remove("t-00000006")
        assert not (base / "k" / "t-00000006").exists()
    finally:
        for box_id in cg.box_ids():
            cg.remove(box_id)
        for d in (base / "k", base):
            if d.exists():
                d.rmdir()


@pytest.mark.skipif(not V2_FULL, reason="/sys/fs/cgroup is not cgroup v2 here (this host has cgroup v1)")
@needs_cgroups
def test_v2_limits_and_oom(cg):
    """Where the unified hierarchy has the controllers: weights, memory.max, pids.max, memory.events."""
    assert cg.version == "v2"
    cg.create("t-00000007", cgroups.Limits(cpu_weight=50, memory_max=48 << 20, pids_max=64))
    d = cg.box_dirs("t-00000007")[0]
    for controller in ("cpu", "memory", "pids"):
        if controller in cg.missing:
            continue
        assert controller in (d / "cgroup.subtree_control").read_text().split()
    limits = cg.limits("t-00000007")
    assert "memory" in cg.missing or limits.memory_max == 48 << 20
    assert "pids" in cg.missing or limits.pids_max == 64
    assert "cpu" in cg.missing or limits.cpu_weight == 50
    if "memory" not in cg.missing:
        hog = subprocess.Popen([PY, "-c", "x = []\nwhile True: x.append(bytearray(1 << 20))"],
                               preexec_fn=cg.placer("t-00000007", "hog"))
        assert hog.wait(30) == -signal.SIGKILL
        assert cg.oom_kills("t-00000007").get("hog") == 1
