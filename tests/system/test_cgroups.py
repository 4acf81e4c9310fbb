"""Per-box cgroups on the real kernel: membership, limits, exact teardown, OOM, accounting.

The module tests talk to /sys/fs/cgroup directly; the box tests run real boxes through the CLI.
This machine has cgroup v1; the v2 backend is exercised on the cgroup2 mount that hybrid
hosts have at /sys/fs/cgroup/unified (membership, kill, removal: no controllers there), and
in full where /sys/fs/cgroup itself is cgroup2.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import BURNER, wait_for

from worktreebox.system import cgroups

PY = sys.executable
HOST_CGROUPS, WHY_NOT = cgroups.detect("probe")
needs_cgroups = pytest.mark.skipif(HOST_CGROUPS is None, reason=f"no cgroups here: {WHY_NOT}")
UNIFIED = Path("/sys/fs/cgroup/unified")
HAVE_CHROMIUM = bool(shutil.which("chromium"))
V2_FULL = (cgroups.CGROUP_FS / "cgroup.controllers").exists()


@pytest.fixture
def cg(tmp_path):
    """The real backend of this host for a private home; every box cgroup it made is removed after."""
    backend, why = cgroups.detect(cgroups.home_key(tmp_path / "home"))
    if backend is None:
        pytest.skip(f"no cgroups here: {why}")
    yield backend
    for key in backend.box_keys():
        backend.remove(key)


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


def start_escaping_daemon(cg, box_id: str, pidfile: Path) -> int:
    """Start, in the box's `web` leaf, a child that double-forks a daemon escaping all but the cgroup
    (new session, env -i, cwd /); the daemon's pid, once it has written it."""
    child = subprocess.Popen(["env", "-i", PY, "-c", ESCAPE, str(pidfile)],
                             preexec_fn=cg.placer(box_id, "web"), start_new_session=True)
    assert child.wait(10) == 0
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return int(pidfile.read_text())


# ---------------------------------------------------------------- the module, on this host's backend

@needs_cgroups
def test_box_cgroup_membership_limits_and_exact_kill(cg, tmp_path):
    cg.create("t-00000001", cgroups.Limits(cpu_weight=50, memory_max=256 << 20, pids_max=200))
    limits = cg.limits("t-00000001")
    assert limits.memory_max == 256 << 20 and limits.pids_max == 200
    assert limits.cpu_weight == 50 or "cpu" in cg.missing
    # The child enters the leaf before exec; the daemon it double-forks (own session, env -i, cwd /)
    # stays in it: a cgroup cannot be left by forking.
    daemon = start_escaping_daemon(cg, "t-00000001", tmp_path / "daemon.pid")
    assert in_cgroup(daemon, cg.relative("t-00000001", "web"))
    assert wait_for(lambda: cg.pids("t-00000001") == {daemon})  # the middle process of the double fork exits
    assert cg.pids("t-00000001", "web") == {daemon}
    assert "00000001" in cg.box_keys() and cg.leaves("t-00000001") == ["web"]

    assert cg.kill("t-00000001") == {daemon}
    assert not alive(daemon) and cg.pids("t-00000001") == set()
    cg.remove("t-00000001")
    assert not cg.exists("t-00000001") and "00000001" not in cg.box_keys()
    assert all(not d.exists() for d in cg.box_dirs("t-00000001"))
    cg.remove("t-00000001")  # idempotent


@needs_cgroups
def test_a_fork_storm_is_killed_whole(cg):
    """Processes that keep forking cannot outrun the kill (v1: freezer; v2: cgroup.kill)."""
    cg.create("t-00000002", cgroups.Limits(pids_max=300))
    storm = ("import os, time\nwhile True:\n    try:\n        os.fork() or time.sleep(0.05)\n"
             "    except OSError:\n        time.sleep(0.01)\n")
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
        assert a.box_keys() == {"0000000a"} and b.box_keys() == {"0000000b"}
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
    # the kernel log outlives test runs that used the same path: look only at what comes now
    seen = max([v["seq"] for v in cgroups.oom_victims(cg.relative("t-00000004"))] or [-1])
    hog = subprocess.Popen([PY, "-c", "x = []\nwhile True: x.append(bytearray(1 << 20))"],
                           preexec_fn=cg.placer("t-00000004", "hog"))
    assert hog.wait(30) == -signal.SIGKILL
    assert cg.oom_kills("t-00000004") == {"hog": 1}
    usage = cg.usage("t-00000004")
    assert usage.memory_peak_bytes is None or 40 << 20 <= usage.memory_peak_bytes <= 48 << 20
    if os.access("/dev/kmsg", os.R_OK):
        victims = cgroups.oom_victims(cg.relative("t-00000004"), after_seq=seen)
        assert [(v["leaf"], v["pid"]) for v in victims] == [("hog", hog.pid)]
        assert victims[0]["task"].startswith("python")
        assert cgroups.oom_victims(cg.relative("t-00000004"), after_seq=victims[0]["seq"]) == []


@needs_cgroups
def test_an_oom_watch_names_only_the_kills_after_it_began_and_does_not_read_the_log_to_begin(cg, tmp_path,
                                                                                           monkeypatch):
    """A supervisor's watch of its box's OOM kills: a kill from before it began is never reported, one
    after it is, named by the kernel log; beginning reads nothing of the log (it holds the host's
    whole history, ~2,300 records on this host: ~3 ms of every supervisor's start)."""
    if "memory" in cg.missing or not os.access("/dev/kmsg", os.R_OK):
        pytest.skip("no memory controller or kernel log here")
    box = "t-0000000e"
    cg.create(box, cgroups.Limits(memory_max=48 << 20))
    hog = [PY, "-c", "x = []\nwhile True: x.append(bytearray(1 << 20))"]
    before = subprocess.Popen(hog, preexec_fn=cg.placer(box, "hog"))
    assert before.wait(30) == -signal.SIGKILL
    from worktreebox.system.cgroups import oom

    read = []
    real = oom.oom_victims
    monkeypatch.setattr(oom, "oom_victims", lambda *a, **k: read.append(a) or real(*a, **k))
    monkeypatch.setattr(oom, "for_home", lambda home: cg)
    watch = oom.OomWatch(tmp_path / "home", box)
    assert read == [] and watch.new_kills() == []
    after = subprocess.Popen(hog, preexec_fn=cg.placer(box, "hog"))
    assert after.wait(30) == -signal.SIGKILL
    assert [(k["leaf"], k["pid"]) for k in watch.new_kills()] == [("hog", after.pid)]
    assert watch.new_kills() == []


@needs_cgroups
def test_usage_counts_cpu_and_pids(cg):
    cg.create("t-00000005", cgroups.Limits())
    burn = subprocess.Popen([PY, "-c", ("import sys, time\nwhile time.process_time() < 0.3: pass\n"
                             "print(flush=True)\ntime.sleep(30)")], stdout=subprocess.PIPE,
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
    base = UNIFIED / f"wtbox-test-{os.getpid()}"  # stands for a delegated subtree
    base.mkdir()
    cg = cgroups.CgroupsV2(base, "k", outside=UNIFIED, mount=UNIFIED)
    try:
        cg.create("t-00000006", cgroups.Limits(cpu_weight=50))  # limits without controllers: not applied
        daemon = start_escaping_daemon(cg, "t-00000006", tmp_path / "daemon.pid")
        line = next(x for x in Path(f"/proc/{daemon}/cgroup").read_text().splitlines() if x.startswith("0::"))
        assert line[3:] == cg.relative("t-00000006", "web") == f"/{base.name}/wtbox-k-00000006/web"
        assert wait_for(lambda: cg.pids("t-00000006") == {daemon}) and cg.box_keys() == {"00000006"}
        assert cg.usage("t-00000006").pids == 1
        assert cg.kill("t-00000006") == {daemon} and not alive(daemon)
        cg.remove("t-00000006")
        assert not (base / "wtbox-k-00000006").exists() and cg.box_keys() == set()
    finally:
        for key in cg.box_keys():
            cg.remove(key)
        base.rmdir()


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


# ---------------------------------------------------------------- real boxes through the CLI

SERVER = '''
import http.server, os, sys
hog = []
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/grow":  # allocate until the kernel says no
            while True:
                hog.append(bytearray(1 << 20))
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
'''

# Escapes everything but the cgroup: a new session, an empty environment, cwd /.
DAEMON_SH = f'env -i {PY} daemon.py "$TMPDIR/daemon.pid"'  # the box's own tmp: writable in a sandbox too


def daemon_pid(pidfile: Path) -> int | None:
    """The host's pid of the daemon that wrote `pidfile` (a sandboxed box's processes write their pid
    in the box's own pid namespace: the last NSpid field)."""
    import psutil

    text = pidfile.read_text() if pidfile.exists() else ""
    if not text:
        return None
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "daemon.py" in " ".join(p.info["cmdline"] or []):
                status = Path(f"/proc/{p.pid}/status").read_text()
                nspid = next(line for line in status.splitlines() if line.startswith("NSpid:")).split()[1:]
                if int(nspid[-1]) == int(text):
                    return p.pid
        except (OSError, StopIteration, psutil.Error):
            continue
    return None


def service_toml(*, name="web", cmd=None, limits="", setup=None, observability=False, browser=False) -> str:
    cmd = cmd or f"{PY} server.py"
    parts = ['[box]\nports = ["web"]\n' + limits,
             '[database]\nmode = "none"\n',
             f"[observability]\nenabled = {'true' if observability else 'false'}\n",
             f'[services.{name}]\ncmd = "{cmd}"\nready = "tcp:{{{{ ports.web }}}}"\nready_timeout = "30s"\n']
    if setup:
        parts.insert(1, f'[setup]\ncmd = "{setup}"\n')
    if browser:
        parts.append("[browser]\nenabled = true\n")
    return "\n".join(parts)


def new_box(run_wtbox, repo, task, *extra) -> dict:
    import json

    return json.loads(run_wtbox("new", task, "--repo", str(repo), "--json", *extra).stdout)


def supervisor_of(box: dict) -> int:
    return int((Path(box["dir"]) / "run" / "supervisor.pid").read_text().split()[0])


def service_pid(run_wtbox, box: dict, name: str = "web") -> int:
    import json

    status = json.loads(run_wtbox("status", box["id"], "--json").stdout)
    return next(s["pid"] for s in status["services"] if s["name"] == name)


@needs_cgroups
def test_every_process_of_a_box_is_in_its_cgroup(make_repo, run_wtbox, wtbox_home):
    setup = "cat /proc/self/cgroup > setup.cgroup"
    repo = make_repo({"server.py": SERVER}, toml=service_toml(setup=setup, observability=True, browser=HAVE_CHROMIUM,
                                                               limits='cpu_weight = 200\nmemory_max = "2G"\n'))
    box = new_box(run_wtbox, repo, "members")
    cg = cgroups.for_home(wtbox_home)
    rel = cg.relative(box["id"])
    assert box["cgroup"]["path"] == rel and box["cgroup"]["memory_max"] == 2 << 30
    assert cg.limits(box["id"]).memory_max == 2 << 30 and cg.limits(box["id"]).cpu_weight == 200
    assert in_cgroup(supervisor_of(box), f"{rel}/_supervisor")
    assert in_cgroup(service_pid(run_wtbox, box), f"{rel}/web")
    vm_pid = int((Path(box["dir"]) / "run" / "victoria-metrics.pid").read_text())
    assert in_cgroup(vm_pid, f"{rel}/_metrics")
    assert f"{rel}/_setup" in (Path(box["path"]) / "setup.cgroup").read_text()
    if HAVE_CHROMIUM:
        chromium = int((Path(box["dir"]) / "run" / "browser.pid").read_text())
        assert in_cgroup(chromium, f"{rel}/_browser")
    shown = run_wtbox("exec", box["id"], "--", "cat", "/proc/self/cgroup").stdout
    assert f"{rel}/_exec" in shown
    # and nothing of the box runs outside it
    from worktreebox.system import procs

    found = {p.pid for p in procs.find_box_processes(box["id"], box["dir"])}
    assert found and found <= cg.pids(box["id"])
    # the collector pushes the whole box's accounting, from the cgroup, into the box's VictoriaMetrics
    import json

    def pushed(name):
        return json.loads(run_wtbox("metrics", box["id"], name, "--json").stdout)["result"]
    assert wait_for(lambda: pushed("wtbox_box_memory_bytes"), timeout=20)
    assert float(pushed("wtbox_box_memory_bytes")[0]["value"][1]) > 1 << 20
    assert float(pushed("wtbox_box_cpu_seconds_total")[0]["value"][1]) > 0
    assert float(pushed("wtbox_box_pids")[0]["value"][1]) >= 3  # supervisor, service, VictoriaMetrics
    run_wtbox("rm", "--force", box["id"])
    assert not cg.exists(box["id"])


@needs_cgroups
def test_escaped_daemon_is_gone_after_down_and_rm(make_repo, run_wtbox, wtbox_home):
    cmd = f"{DAEMON_SH}; exec {PY} server.py"
    repo = make_repo({"server.py": SERVER, "daemon.py": ESCAPE}, toml=service_toml(cmd=cmd.replace('"', '\\"')))
    box = new_box(run_wtbox, repo, "escape")
    pidfile = Path(box["dir"]) / "tmp" / "daemon.pid"
    daemon = wait_for(lambda: daemon_pid(pidfile))
    assert alive(daemon)
    environ = Path(f"/proc/{daemon}/environ").read_bytes()
    assert b"WTBOX_ID" not in environ and os.readlink(f"/proc/{daemon}/cwd") == "/"  # invisible to the sweep
    # `down web` ends everything in the service's cgroup, its own session notwithstanding
    run_wtbox("down", box["id"], "web")
    assert wait_for(lambda: not alive(daemon), timeout=10)

    pidfile.unlink()
    run_wtbox("up", box["id"], "web")
    daemon = wait_for(lambda: daemon_pid(pidfile))
    # one more, started by hand through exec: it leaves the box dir and its environment as well
    pidfile.unlink()
    run_wtbox("exec", box["id"], "--", "sh", "-c", DAEMON_SH + " >/dev/null 2>&1")
    second = wait_for(lambda: daemon_pid(pidfile))
    assert alive(daemon) and alive(second)
    run_wtbox("rm", "--force", box["id"])
    assert not alive(daemon) and not alive(second)
    assert not cgroups.for_home(wtbox_home).exists(box["id"])


def _get(port: int, path: str = "/", timeout: float = 5.0) -> int | None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status
    except (urllib.error.URLError, OSError):
        return None


@needs_cgroups
def test_memory_limit_kills_in_its_box_only_and_says_so(make_repo, run_wtbox, wtbox_home):
    import json
    import re

    if "memory" in cgroups.for_home(wtbox_home).missing:
        pytest.skip("no memory controller on this host")
    repo_a = make_repo({"server.py": SERVER}, toml=service_toml(limits='memory_max = "96M"\n', observability=True))
    repo_b = make_repo({"server.py": SERVER}, toml=service_toml())
    a, b = new_box(run_wtbox, repo_a, "hungry"), new_box(run_wtbox, repo_b, "bystander")
    before = service_pid(run_wtbox, a)
    assert _get(a["ports"]["web"], "/grow", timeout=30) is None  # the handler dies mid-request
    assert _get(b["ports"]["web"]) == 200  # B never noticed
    # A's service was killed by the kernel inside A, and the supervisor restarted it
    assert wait_for(lambda: _get(a["ports"]["web"], timeout=1) == 200, timeout=30)
    status = json.loads(run_wtbox("status", a["id"], "--json").stdout)
    web = next(s for s in status["services"] if s["name"] == "web")
    assert web["restarts"] >= 1 and web["pid"] != before
    errors = [json.loads(line) for line in run_wtbox("logs", a["id"], "--level", "error", "--json").stdout.splitlines()]
    oom = [r for r in errors if "killed process" in r["msg"]]
    assert oom and re.search(r"killed process \d+ \(python", oom[0]["msg"]) and "memory_max 96 MiB" in oom[0]["msg"]
    assert oom[0]["service"] == "web"
    events = [json.loads(line) for line in run_wtbox("logs", a["id"], "--json").stdout.splitlines()]
    said = [i for i, r in enumerate(events) if "killed process" in r["msg"]]
    restarted = [i for i, r in enumerate(events) if r.get("event") == "restart"]
    assert said and restarted and said[0] < restarted[0]  # the cause comes before the restart
    assert run_wtbox("logs", b["id"], "--level", "error", "--json").stdout.strip() == ""
    # the counter reached the box's VictoriaMetrics
    def counted():
        out = json.loads(run_wtbox("metrics", a["id"], "wtbox_box_oom_kills_total", "--json").stdout)
        return [r for r in out["result"] if r["metric"].get("service") == "web" and float(r["value"][1]) >= 1]
    assert wait_for(counted, timeout=20)
    run_wtbox("rm", "--force", a["id"], b["id"])


def probe_p95(run_wtbox, box: dict, n: int, env: dict | None = None) -> float:
    import json

    return json.loads(run_wtbox("probe", box["id"], "/", "-n", str(n), "--json", env=env).stdout)["p95_ms"]


def fairness(make_repo, run_wtbox, burners: int, rounds: int = 10, n: int = 60, env: dict | None = None,
             while_burning=None) -> tuple[list[float], list[float]]:
    """B's probe p95 (ms) per round without and with A's burners spinning, alternating so that the
    host's own noise (other jobs on the machine) falls on both alike. A's burners run from the
    start and spin while a flag file exists: no process start inside the measurement.
    `while_burning(a, b)` runs once at the end with A burning."""
    repo_a = make_repo({"burner.py": BURNER}, toml=service_toml(
        name="burn", cmd=f"{PY} burner.py $TMPDIR/spin {burners}").replace(
        'ready = "tcp:{{ ports.web }}"\n', ""))
    repo_b = make_repo({"server.py": SERVER}, toml=service_toml(limits='memory_max = "512M"\npids_max = 100\n'))
    a = json_of(run_wtbox("new", "burner", "--repo", str(repo_a), "--json", env=env))
    b = json_of(run_wtbox("new", "latency", "--repo", str(repo_b), "--json", env=env))
    flag = Path(a["dir"]) / "tmp" / "spin"  # the box's own tmp: a sandboxed box sees it
    quiet, loaded = [], []
    try:
        probe_p95(run_wtbox, b, 50, env)  # warm up
        for _ in range(rounds):
            quiet.append(probe_p95(run_wtbox, b, n, env))
            flag.touch()
            # The burners look for the flag every 20 ms; A's supervisor needs a few looks (up to
            # 1.5 s) to see them burn and make A a background box (background.py), as it would
            # for a runaway test suite that burns for longer than a moment.
            time.sleep(2.0)
            loaded.append(probe_p95(run_wtbox, b, n, env))
            flag.unlink()
            time.sleep(0.1)
        if while_burning is not None:
            flag.touch()
            while_burning(a, b)
    finally:
        flag.unlink(missing_ok=True)
        run_wtbox("rm", "--force", a["id"], b["id"], env=env)
    return quiet, loaded


def check_top(run_wtbox, a: dict, b: dict) -> None:
    """`top` lists one row per box, busiest first, with what the cgroups say."""
    import json

    rows = json.loads(run_wtbox("top", "--json").stdout)
    assert [r["id"] for r in rows] == [a["id"], b["id"]]  # sorted by CPU: A is burning
    busy, idle = rows
    assert busy["cpu_percent"] > 10 and idle["cpu_percent"] < busy["cpu_percent"]
    for r in rows:
        assert r["memory_bytes"] > 1 << 20 and r["pids"] >= 2 and r["state"] == "ready" and r["source"] == "cgroup"
    assert idle["ports"] == b["ports"] and idle["memory_max"] == 512 << 20 and idle["pids_max"] == 100
    table = run_wtbox("top").stdout
    assert a["id"] in table.splitlines()[1] and "/ 512.0M" in table
    watch = subprocess.Popen([PY, "-m", "worktreebox.cli.main", "top", "--watch", "--json"], stdout=subprocess.PIPE,
                             text=True, env={**os.environ})
    try:
        frames = [json.loads(watch.stdout.readline()) for _ in range(2)]  # one array per refresh
        assert [len(f) for f in frames] == [2, 2]
    finally:
        watch.terminate()
        watch.wait(10)


def json_of(proc) -> dict:
    import json

    return json.loads(proc.stdout)


@needs_cgroups
@pytest.mark.serial  # a latency ratio: other tests' load would be measured too
def test_a_cpu_burning_box_does_not_slow_another(make_repo, run_wtbox):
    """Box A runs more CPU burners than cores, each in its own session; box B's p95 stays within 1.5x.

    Fair share with two boxes on two cores: each box is owed half the machine (one core's worth)
    whenever both want CPU, however many processes or sessions it has. B's handler needs a few
    milliseconds of one core, far less than its half, so it runs almost as if A were idle; without
    cgroups each of A's sessions is an autogroup as heavy as all of B, and B gets 1/(burners+1).
    """
    burners = 2 * os.cpu_count() + 1
    # Each round's two measurements are a second apart, so the other jobs on this shared machine
    # weigh on both alike: the median of the per-round ratios is what A's burners did to B. A p95
    # of 200 requests (the 10th slowest) rather than of 60 (the 3rd): a few waits of one kernel
    # tick (4 ms) no longer decide it. Work outside every box (another test session) can still
    # land on the loaded halves, so a second measurement is allowed. The same measurement
    # without cgroups (scripts/bench.py --only cgroups): 2.1-4.2x on a quiet host.
    for _attempt in range(2):
        quiet, loaded = fairness(make_repo, run_wtbox, burners, n=200,
                                 while_burning=lambda a, b: check_top(run_wtbox, a, b))
        ratio = statistics.median(lo / q for q, lo in zip(quiet, loaded, strict=True))
        print(f"B's probe p95 quiet {quiet} ms, with A's {burners} burners {loaded} ms: {ratio:.2f}x")
        if ratio <= 1.5:
            break
    assert ratio <= 1.5, f"B's probe p95 rose {ratio:.2f}x with A burning ({quiet} vs {loaded} ms)"


def cpu_shares_while_both_burn(make_repo, run_wtbox, env: dict | None = None, window: float = 3.0) -> float:
    """B's part of the CPU the two boxes got while A spun 2x cores + 1 burners (each in its own
    session) and B one, measured from the processes themselves (psutil), with or without cgroups."""
    from worktreebox.system import procs

    burners_a = 2 * os.cpu_count() + 1
    toml = lambda n: service_toml(name="burn", cmd=f"{PY} burner.py $TMPDIR/spin {n}").replace(
        'ready = "tcp:{{ ports.web }}"\n', "")
    a = json_of(run_wtbox("new", "hog", "--repo", str(make_repo({"burner.py": BURNER}, toml=toml(burners_a))),
                          "--json", env=env))
    b = json_of(run_wtbox("new", "modest", "--repo", str(make_repo({"burner.py": BURNER}, toml=toml(1))),
                          "--json", env=env))
    try:
        def cpu(box: dict) -> float:
            total = 0.0
            for p in procs.find_box_processes(box["id"], box["dir"]):
                try:
                    total += sum(p.cpu_times()[:2])
                except Exception:
                    pass
            return total

        for box in (a, b):
            (Path(box["dir"]) / "tmp" / "spin").touch()
        time.sleep(2.0)  # every burner is spinning, and both boxes are background (background.py)
        a0, b0 = cpu(a), cpu(b)
        time.sleep(window)
        got_a, got_b = cpu(a) - a0, cpu(b) - b0
    finally:
        run_wtbox("rm", "--force", a["id"], b["id"], env=env)
    return got_b / (got_a + got_b)


@needs_cgroups
@pytest.mark.serial  # shares of the CPU: other tests' load would take some
def test_each_box_gets_its_fair_share_of_cpu_however_many_processes_it_runs(make_repo, run_wtbox):
    """Fair share is per box: with A spinning 5 processes in 5 sessions and B one, B gets half of
    what the two get (each box is owed one of the 2 cores). Without cgroups every session is an
    autogroup as heavy as all of B, so B gets about 1/6: the same measurement shows it."""
    with_cgroups = cpu_shares_while_both_burn(make_repo, run_wtbox)
    without = cpu_shares_while_both_burn(make_repo, run_wtbox, env={"WTBOX_CGROUPS": "off"})
    print(f"B's share of the CPU: {with_cgroups:.2f} with cgroups, {without:.2f} without")
    assert with_cgroups >= 0.4, f"B got {with_cgroups:.0%} of the CPU with cgroups (fair: 50%)"
    assert without <= 0.3, f"without cgroups B got {without:.0%}: the measurement cannot tell fair from unfair"


# ---------------------------------------------------------------- top, admission, gc, config

def test_max_active_makes_new_wait_or_refuse(make_repo, run_wtbox, wtbox_home):
    import json
    import threading

    wtbox_home.mkdir(parents=True, exist_ok=True)
    (wtbox_home / "config.toml").write_text("[host]\nmax_active = 1\n")
    repo = make_repo({"server.py": SERVER}, toml=service_toml())
    a = new_box(run_wtbox, repo, "first")
    refused = run_wtbox("new", "second", "--repo", str(repo), "--no-wait", check=False)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and refused.stderr.startswith("wtbox: This host is full: 1 of its [host] "
                                                                            "max_active = 1 boxes are active;")
    waiting = subprocess.Popen([PY, "-m", "worktreebox.cli.main", "new", "third", "--repo", str(repo), "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(waiting.stderr), daemon=True)
    reader.start()
    try:
        assert wait_for(lambda: any("waiting for room on this host" in line for line in lines), timeout=30)
        assert [b["task"] for b in json.loads(run_wtbox("ls", "--json").stdout)] == ["first"]  # nothing made yet
        run_wtbox("down", a["id"])  # a box whose services are down runs nothing: the slot is free
        out, _ = waiting.communicate(timeout=120)
        assert waiting.returncode == 0, lines
        third = json.loads(out)
        assert sorted(b["task"] for b in json.loads(run_wtbox("ls", "--json").stdout)) == ["first", "third"]
        assert sum("waiting for room" in line for line in lines) == 1  # one progress line, not one per poll
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    run_wtbox("rm", "--force", a["id"], third["id"])


@needs_cgroups
def test_gc_removes_orphaned_box_cgroups_of_its_home_only(run_wtbox, wtbox_home, tmp_path):
    import json

    mine = cgroups.for_home(wtbox_home)
    other_home = tmp_path / "other-home"
    other, _ = cgroups.detect(cgroups.home_key(other_home))
    mine.create("orphan-0000abcd", cgroups.Limits(pids_max=50))
    sleeper = subprocess.Popen(["sleep", "300"], preexec_fn=mine.placer("orphan-0000abcd", "_exec"))
    other.create("other-0000abcd", cgroups.Limits())
    try:
        plan = json.loads(run_wtbox("gc", "--dry-run", "--json").stdout)
        assert [(a["id"], a["reason"]) for a in plan["actions"]] == [
            ("wt_0000abcd", "orphan: cgroup with no registry row")]
        run_wtbox("gc", "--grace", "0")
        assert sleeper.wait(10) == -signal.SIGKILL
        assert not mine.exists("orphan-0000abcd") and other.exists("other-0000abcd")
    finally:
        sleeper.kill()
        sleeper.wait()
        other.remove("other-0000abcd")


def test_limits_are_checked_with_file_and_key(make_repo, run_wtbox, wtbox_home):
    repo = make_repo(toml='[box]\nmemory_max = "lots"\n')
    proc = run_wtbox("new", "bad", "--repo", str(repo), check=False)
    assert proc.returncode == 2
    assert ("wtbox.toml: [box] memory_max: expected a size such as \"512M\" or \"2G\", or \"max\", got 'lots'."
            in proc.stderr)
    wtbox_home.mkdir(parents=True, exist_ok=True)
    (wtbox_home / "config.toml").write_text("[box]\ncpu_weight = 0\n")
    proc = run_wtbox("new", "bad", "--repo", str(make_repo(toml='[database]\nmode = "none"\n')), check=False)
    expected = f"{wtbox_home / 'config.toml'}: [box] cpu_weight: expected a whole number"
    assert proc.returncode == 2 and expected in proc.stderr
    (wtbox_home / "config.toml").write_text("[host]\nmax_load = -1\n")
    proc = run_wtbox("new", "bad", "--repo", str(make_repo(toml='[database]\nmode = "none"\n')), check=False)
    assert proc.returncode == 2 and "[host] max_load: expected a load average above 0" in proc.stderr


def test_limits_merge_repo_over_host_defaults():
    from worktreebox.config.load import UNLIMITED, LimitsConfig
    from worktreebox.resources.cgroup import effective_limits

    host = LimitsConfig(cpu_weight=50, memory_max=2 << 30, pids_max=500)
    assert effective_limits(LimitsConfig(), host) == cgroups.Limits(50, 2 << 30, 500)
    assert effective_limits(LimitsConfig(memory_max=UNLIMITED, pids_max=64), host) == cgroups.Limits(50, None, 64)
    assert effective_limits(LimitsConfig(), LimitsConfig()) == cgroups.Limits()


@needs_cgroups
def test_a_box_claimed_from_the_pool_keeps_its_cgroup(make_repo, run_wtbox, host):
    """Claiming renames `pool-<hex>` to `<task>-<hex>`; the running supervisor keeps calling it by the
    pool id. Both names lead to the one cgroup (named by the hex), so nothing runs outside it."""
    import json

    from worktreebox.box import hex_of
    from worktreebox.fleet import pool as P
    from worktreebox.resources.cgroup import POOL_CPU_WEIGHT

    repo = make_repo({"server.py": SERVER}, toml=service_toml())
    P.top_up(host, P.resolve_target(repo), 1)
    (pooled,) = [b for b in host.list() if b.pool]
    cg = cgroups.for_home(host.home)
    # made and kept at the pool's low weight: filling the pool never slows the boxes in use
    assert cg.limits(pooled.id).cpu_weight == POOL_CPU_WEIGHT < cgroups.DEFAULT_CPU_WEIGHT
    supervisor = supervisor_of({"dir": str(pooled.dir)})
    out = json.loads(run_wtbox("new", "claimed", "--repo", str(repo), "--json").stdout)
    assert out["from_pool"] is True and hex_of(out["id"]) == hex_of(pooled.id)
    assert cg.limits(out["id"]).cpu_weight == cgroups.DEFAULT_CPU_WEIGHT  # a box in use: its own weight
    assert "pooled_cpu_weight" not in json.loads(run_wtbox("status", out["id"], "--json").stdout)["cgroup"]
    rel = cg.relative(out["id"])
    assert rel == cg.relative(pooled.id) and in_cgroup(supervisor, f"{rel}/_supervisor")
    assert in_cgroup(service_pid(run_wtbox, out), f"{rel}/web")
    assert f"{rel}/_exec" in run_wtbox("exec", out["id"], "--", "cat", "/proc/self/cgroup").stdout
    run_wtbox("restart", out["id"], "web")  # the old supervisor starts it again: in the same leaf
    assert in_cgroup(service_pid(run_wtbox, out), f"{rel}/web")
    assert json.loads(run_wtbox("gc", "--grace", "0", "--dry-run", "--json").stdout)["actions"] == []
    run_wtbox("rm", "--force", out["id"])
    assert not cg.exists(out["id"]) and cg.box_keys() == set()


@needs_cgroups
@pytest.mark.serial  # any gc running beside it sweeps the same gone home's cgroups (its list must be exactly ours)
def test_gc_of_any_home_removes_the_cgroups_of_a_home_that_is_gone(make_repo, run_wtbox, tmp_path):
    """A deleted home cannot run its own gc: its boxes' cgroups (and what still runs in them) would
    stay on the host until a reboot. Another home's gc removes them; a live home's are kept."""
    import json

    from worktreebox.providers.mounts.base import unmount_all

    repo = make_repo(toml='[database]\nmode = "none"\n[observability]\nenabled = false\n')
    gone, alive_home = tmp_path / "gone", tmp_path / "alive"
    env = {**os.environ, "WTBOX_NO_AUTO_GC": "1"}

    def cli(home, *args):
        proc = subprocess.run([PY, "-m", "worktreebox.cli.main", *args], capture_output=True, text=True,
                              env={**env, "WTBOX_HOME": str(home)}, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc

    doomed = json.loads(cli(gone, "new", "doomed", "--repo", str(repo), "--json").stdout)
    kept = json.loads(cli(alive_home, "new", "kept", "--repo", str(repo), "--json").stdout)
    backend_gone, backend_alive = cgroups.for_home(gone), cgroups.for_home(alive_home)
    left = subprocess.Popen(["sleep", "300"], preexec_fn=backend_gone.placer(doomed["id"], "_exec"))
    try:
        unmount_all(gone)
        shutil.rmtree(gone)  # the user deleted the home; the sleeper still runs in its box's cgroup
        out = json.loads(run_wtbox("gc", "--grace", "0", "--json").stdout)
        assert left.wait(10) == -signal.SIGKILL
        assert not backend_gone.exists(doomed["id"])
        assert backend_alive.exists(kept["id"])
        assert out["cgroups"] == [f"{cgroups.key_of(doomed['id'])} of {gone} (home is gone)"]
        from worktreebox.system import home_records as homes

        # the note goes with the last cgroup: notes of deleted homes do not pile up on the host
        assert homes.path_of(cgroups.home_key(gone)) is None
        assert homes.path_of(cgroups.home_key(alive_home)) == os.path.realpath(alive_home)
    finally:
        left.kill()
        left.wait()
        cli(alive_home, "rm", "--force", kept["id"])
        subprocess.run(["git", "-C", str(repo), "worktree", "prune"], check=False)
        for key in backend_gone.box_keys():
            backend_gone.remove(key)


@needs_cgroups
def test_a_pids_max_too_low_for_the_box_fails_new_naming_pids_max(make_repo, run_wtbox):
    """Defect 3: `pids_max = 1` failed `new` with "CalledProcessError: Command '/usr/bin/victoria-metrics'
    returned non-zero exit status 2", not naming pids_max."""
    if "pids" in HOST_CGROUPS.missing:
        pytest.skip("this host's cgroups have no pids controller")
    repo = make_repo({"server.py": SERVER}, toml=service_toml(limits="pids_max = 1\n", observability=True))
    proc = run_wtbox("new", "tight", "--repo", str(repo), check=False)
    assert proc.returncode == 1 and "pids_max" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert json.loads(run_wtbox("ls", "--json").stdout) == []
