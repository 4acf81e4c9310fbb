"""A box that heals and never lies (issue 19): host-wide port leases, honest readiness,
supervisor crash recovery and a box environment fixed at creation. Real processes, real ports.
"""
from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from helpers import CORE_TOML, box_runs, wait_for

pytestmark = pytest.mark.slow  # real boxes, services and supervisors

PY = sys.executable
# Answers every GET with 404 "stranger": a readiness check below 500 would take it for the service.
STRANGER = r'''
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(404); self.end_headers(); self.wfile.write(b"stranger")
    def log_message(self, *a): pass
srv = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H)
print("listening", flush=True)
srv.serve_forever()
'''
# Prints a line per request (so its output goes through whatever carries it) and which python runs it.
SERVER = r'''
import http.server, os, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("ok %s %s" % (sys.executable, os.environ.get("HEAL_MARK", "-"))).encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, fmt, *a):
        sys.stderr.write("request " + fmt % a + " " + "x" * 2000 + "\n")
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
'''
WEB = CORE_TOML + """
[box]
ports = ["web"]

[services.web]
cmd = "python3 server.py"
ready = "http://127.0.0.1:{{ ports.web }}/"
ready_timeout = "8s"
"""


def _range() -> str:
    base = 30000 + random.randrange(20) * 50
    return f"{base}-{base + 49}"


def _cli(home: Path, *args: str, env: dict | None = None, check: bool = True, timeout: float = 120):
    full = {**os.environ, "WTBOX_HOME": str(home), "WTBOX_NO_AUTO_GC": "1", **(env or {})}
    proc = subprocess.run([PY, "-m", "worktreebox.cli.main", *args], capture_output=True, text=True, env=full,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"wtbox {' '.join(args)}: {proc.returncode}\n{proc.stderr}")
    return proc


def _get(port: int) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=3) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _box_pids(box_id: str) -> list[int]:
    out = []
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and p.environ().get("WTBOX_ID") == box_id:
                out.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def _listener(port: int) -> int | None:
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port:
            return c.pid
    return None


@pytest.fixture
def stranger():
    """stranger(port) starts a foreign HTTP server on port (no WTBOX_ID, not in any box)."""
    procs = []

    def start(port: int) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WTBOX_")}
        p = subprocess.Popen([PY, "-c", STRANGER, str(port)], env=env, stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "listening"
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


# ---------------------------------------------------------------- 1. host-wide leases

def test_two_homes_in_parallel_get_disjoint_ports(tmp_path, make_repo):
    repo = make_repo(toml=CORE_TOML + '[box]\nports = ["web", "api"]\n')
    same_range = {"WTBOX_PORT_RANGE": _range()}  # both homes lease from the very same ports
    homes = [tmp_path / "home-a", tmp_path / "home-b"]
    jobs = [(home, f"t{i}") for home in homes for i in range(3)]

    def new(job):
        home, task = job
        return json.loads(_cli(home, "new", task, "--repo", str(repo), "--no-services", "--json",
                               env=same_range).stdout)

    with ThreadPoolExecutor(6) as pool:
        boxes = list(pool.map(new, jobs))
    try:
        ports = [p for b in boxes for p in b["ports"].values()]
        assert len(ports) == 12 and len(set(ports)) == 12, sorted(ports)
    finally:
        for home in homes:
            _cli(home, "rm", "--all", "--yes", "--force", check=False)


def test_lease_of_a_home_that_is_gone_is_reclaimed(tmp_path, make_repo):
    """A home deleted with its boxes still leased must not hold the host's ports forever."""
    repo = make_repo(toml=CORE_TOML + '[box]\nports = ["web"]\n')
    rng = {"WTBOX_PORT_RANGE": _range()}
    lo = int(rng["WTBOX_PORT_RANGE"].split("-")[0])
    gone = tmp_path / "gone"
    first = json.loads(_cli(gone, "new", "a", "--repo", str(repo), "--no-services", "--json", env=rng).stdout)
    assert first["ports"]["web"] == lo
    import shutil

    from worktreebox.providers.mounts.base import unmount_all

    # Mounts live on the host, not in the home: rmtree cannot delete a mounted view. The box's
    # cgroup outlives the home too; the other home's gc removes it (test_cgroups checks that).
    unmount_all(gone)
    shutil.rmtree(gone)  # the user deleted the home (a test's tmp dir, a reinstall)
    _cli(tmp_path / "other", "gc", "--grace", "0", env=rng)
    again = json.loads(_cli(tmp_path / "other", "new", "b", "--repo", str(repo), "--no-services", "--json",
                            env=rng).stdout)
    try:
        assert again["ports"]["web"] == lo
    finally:
        _cli(tmp_path / "other", "rm", "--all", "--yes", "--force", check=False)
        subprocess.run(["git", "-C", str(repo), "worktree", "prune"], check=False)


OFF = {"WTBOX_SANDBOX": "off"}  # a stranger can take a leased port only where boxes are not sandboxed


def test_a_sandboxed_boxs_leased_port_cannot_be_taken(make_repo, wtbox_home):
    """The box's supervisor holds its leased ports on the host from `new` on: no stranger gets them."""
    import socket

    repo = make_repo({"server.py": SERVER}, toml=WEB)
    box = json.loads(_cli(wtbox_home, "new", "held", "--repo", str(repo), "--json").stdout)
    try:
        if (box.get("sandbox") or {}).get("provider") in (None, "off"):
            pytest.skip("boxes are not sandboxed here")
        with socket.socket() as s, pytest.raises(OSError):
            s.bind(("127.0.0.1", box["ports"]["web"]))
        assert _get(box["ports"]["web"])[0] == 200
    finally:
        _cli(wtbox_home, "rm", "--force", box["id"], check=False)


def test_foreign_listener_on_a_leased_port_fails_up_naming_port_and_holder(make_repo, wtbox_home, stranger):
    repo = make_repo({"server.py": SERVER}, toml=WEB)
    box = json.loads(_cli(wtbox_home, "new", "squat", "--repo", str(repo), "--no-services", "--json", env=OFF).stdout)
    port = box["ports"]["web"]
    try:
        squatter = stranger(port)
        proc = _cli(wtbox_home, "up", box["id"], check=False, env=OFF)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert str(port) in lines[0] and str(squatter.pid) in lines[0], lines[0]
        assert _box_pids(box["id"]) == []  # the service was never started
        assert _get(port) == (404, b"stranger")
    finally:
        _cli(wtbox_home, "rm", "--force", box["id"], check=False)


# ---------------------------------------------------------------- 2. honest readiness

def test_stranger_on_the_port_before_the_service_starts_is_never_ready(make_repo, wtbox_home, stranger):
    """The stranger binds the leased port while `new` runs its setup: `new` must not say ready."""
    toml = WEB.replace("[services.web]", '[setup]\ncmd = "sleep 1.5"\n\n[services.web]')
    repo = make_repo({"server.py": SERVER}, toml=toml)
    proc = subprocess.Popen([PY, "-m", "worktreebox.cli.main", "new", "late", "--repo", str(repo), "--json"],
                            env={**os.environ, "WTBOX_HOME": str(wtbox_home), "WTBOX_NO_AUTO_GC": "1", **OFF},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def leased():
        try:
            with sqlite3.connect(wtbox_home / "registry.sqlite3", timeout=1) as db:
                row = db.execute("SELECT port FROM port_leases WHERE owner LIKE 'late-%'").fetchone()
                return row and row[0]
        except sqlite3.Error:
            return None

    port = wait_for(leased, timeout=30, every=0.02)
    assert port
    squatter = stranger(port)
    out, err = proc.communicate(timeout=120)
    try:
        if proc.returncode == 0:
            box = json.loads(out)
            assert box["ports"]["web"] != port  # it moved to another port, where the service answers
            assert _get(box["ports"]["web"])[0] == 200
        else:
            lines = [line for line in err.strip().splitlines() if "not sandboxed" not in line]  # said once per home
            assert proc.returncode == 1 and str(port) in lines[0] and "Traceback" not in err, err
            assert str(squatter.pid) in err, err
        assert _get(port) == (404, b"stranger")
    finally:
        _cli(wtbox_home, "rm", "--all", "--yes", "--force", check=False)


def test_readiness_answered_by_a_process_outside_the_service_is_not_ready(make_repo, host):
    """A one-shot service plants a detached squatter on web's port; web's HTTP check gets answers,
    but not from web: web must fail, with its own last lines, not be reported ready."""
    # binds web's port, then leaves as a daemon (own session, reparented away from squat's tree)
    squat = r'''
import http.server, os, sys, time
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(404); self.end_headers(); self.wfile.write(b"stranger")
    def log_message(self, *a): pass
srv = http.server.HTTPServer(("127.0.0.1", int(os.environ["WTBOX_PORT_WEB"])), H)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        open("bound", "w").close()
        srv.serve_forever()
    os._exit(0)
time.sleep(3)
'''
    toml = CORE_TOML + """
[box]
ports = ["web"]

[services.squat]
cmd = "python3 squat.py"
ready = "test -f bound"
restart = "no"

[services.web]
cmd = "python3 server.py"
ready = "http://127.0.0.1:{{ ports.web }}/"
ready_timeout = "4s"
depends_on = ["squat"]
"""
    repo = make_repo({"server.py": SERVER, "squat.py": squat}, toml=toml)
    from worktreebox.errors import WtboxError

    with pytest.raises(WtboxError) as e:
        host.new("liar", repo=repo)
    msg = str(e.value)
    assert "'web'" in msg and ("in use" in msg or "held by" in msg), msg
    assert host.list() == []


# ---------------------------------------------------------------- 3. supervisor crash

def _status(home: Path, box_id: str) -> dict:
    return json.loads(_cli(home, "status", box_id, "--json").stdout)


def _supervisor_pid(home: Path, box_id: str) -> int:
    return int((home / "boxes" / box_id / "run" / "supervisor.pid").read_text().split()[0])


def test_killed_supervisor_is_degraded_then_up_recovers_on_the_same_port(make_repo, wtbox_home):
    repo = make_repo({"server.py": SERVER}, toml=WEB)
    box = json.loads(_cli(wtbox_home, "new", "crash", "--repo", str(repo), "--json").stdout)
    port = box["ports"]["web"]
    try:
        svc_pid = {s["name"]: s for s in box["services"]}["web"]["pid"]
        sandboxed = (box.get("sandbox") or {}).get("provider") not in (None, "off")
        os.kill(_supervisor_pid(wtbox_home, box["id"]), signal.SIGKILL)
        # the service must not hang on its output while nobody supervises it: it logs a long
        # line per request, more than a pipe holds (a sandboxed box's is reached inside it: the
        # host's port was the killed supervisor's forward)
        if sandboxed:
            inside = (box.get("inside_ports") or box["ports"])["web"]
            gets = f"import urllib.request as u\nfor _ in range(60): u.urlopen('http://127.0.0.1:{inside}/', timeout=3)"
            _cli(wtbox_home, "exec", box["id"], "--", PY, "-c", gets)
        else:
            for _ in range(60):
                assert _get(port)[0] == 200
        st = _status(wtbox_home, box["id"])
        assert st["state"] == "degraded" and "supervisor" in st.get("reason", ""), st
        up = json.loads(_cli(wtbox_home, "up", box["id"], "--json").stdout)
        web = {s["name"]: s for s in up["services"]}["web"]
        assert web["state"] == "ready" and web["port"] == port
        assert _get(port)[0] == 200
        children = [c.pid for c in psutil.Process(web["pid"]).children(recursive=True)]
        assert sandboxed or _listener(port) == web["pid"] or _listener(port) in children
        assert not psutil.pid_exists(svc_pid) or psutil.Process(svc_pid).status() == psutil.STATUS_ZOMBIE \
            or svc_pid == web["pid"]  # ended, or adopted
        st = _status(wtbox_home, box["id"])
        assert st["state"] == "ready", st
        # down and restart work after the crash; down leaves no orphan
        _cli(wtbox_home, "restart", box["id"])
        assert _get(port)[0] == 200
        _cli(wtbox_home, "down", box["id"])
        assert box_runs(box["id"], Path(box["dir"])) == []  # (a sandboxed box's holder and supervisor stay)
    finally:
        _cli(wtbox_home, "rm", "--force", box["id"], check=False)
    assert _box_pids(box["id"]) == []


def test_secrets_are_gone_after_a_supervisor_crash_and_status_says_so(make_repo, wtbox_home):
    repo = make_repo({"server.py": SERVER}, toml=WEB)
    box = json.loads(_cli(wtbox_home, "new", "sec", "--repo", str(repo), "--secret", "HEAL_MARK", "--json",
                          env={"HEAL_MARK": "s3cret-" + os.urandom(4).hex()}).stdout)
    try:
        os.kill(_supervisor_pid(wtbox_home, box["id"]), signal.SIGKILL)
        st = _status(wtbox_home, box["id"])
        assert st["state"] == "degraded" and "--secret HEAL_MARK" in st["reason"], st
    finally:
        _cli(wtbox_home, "rm", "--force", box["id"], check=False)


# ---------------------------------------------------------------- 4. a fixed box environment

def test_up_from_a_shell_with_another_path_behaves_as_at_creation(make_repo, wtbox_home, tmp_path):
    """The service runs `python3`: at creation PATH finds this venv's; `up` from a shell whose PATH
    finds a different python3 first must still start the box's."""
    decoy = tmp_path / "decoy-bin"
    decoy.mkdir()
    (decoy / "python3").write_text("#!/bin/sh\necho 'decoy python3: wrong PATH' >&2\nexit 7\n")
    (decoy / "python3").chmod(0o755)
    venv_bin = str(Path(PY).parent)
    created_path = f"{venv_bin}:{os.environ['PATH']}"
    repo = make_repo({"server.py": SERVER}, toml=WEB)
    box = json.loads(_cli(wtbox_home, "new", "env", "--repo", str(repo), "--json",
                          env={"PATH": created_path, "HEAL_MARK": "at-creation"}).stdout)
    try:
        port = box["ports"]["web"]
        first = _get(port)[1]
        assert first == f"ok {Path(venv_bin) / 'python3'} -".encode(), first  # HEAL_MARK is not inherited
        _cli(wtbox_home, "down", box["id"])
        other = {"PATH": f"{decoy}:{os.environ['PATH']}", "HEAL_MARK": "from-another-shell"}
        _cli(wtbox_home, "up", box["id"], env=other)
        assert _get(port)[1] == first  # same python3, and a variable of the other shell did not leak in
        _cli(wtbox_home, "restart", box["id"], env=other)
        assert _get(port)[1] == first
        out = _cli(wtbox_home, "exec", box["id"], "--", "sh", "-c", 'command -v python3; echo "${HEAL_MARK:-unset}"',
                   env=other).stdout.split()
        assert out[0] != str(decoy / "python3") and out[1] == "unset", out
        st = _status(wtbox_home, box["id"])
        assert "PATH" in st["inherited_env"] and "HEAL_MARK" not in st["inherited_env"], st.get("inherited_env")
    finally:
        _cli(wtbox_home, "rm", "--force", box["id"], check=False)


def test_lease_store_claims_releases_and_takes_over_only_what_is_stale(tmp_path):
    """The host-wide claim files themselves (a private directory, real files)."""
    from worktreebox.system.leases import HostLeases

    store = tmp_path / "leases"
    store.mkdir()
    homes = [tmp_path / "a", tmp_path / "b"]
    for h in homes:
        (h / "boxes").mkdir(parents=True)
    a, b = (HostLeases(h, store) for h in homes)
    assert a.claim(30001, "box-a-00000001", "web")
    assert not b.claim(30001, "box-b-00000002", "web")  # taken by another home
    assert not a.claim(30001, "box-a-00000003", "web")  # and by another box of the same home
    b.release(30001, "box-b-00000002")  # not b's: nothing happens
    assert a.holder(30001)["owner"] == "box-a-00000001"
    # a pool box renamed when claimed: the registry's ports are released whatever the claim's name
    a.release_owner("fix-a-00000001", ports=[30001])
    assert a.holder(30001) is None
    # gc keeps a claim its registry knows by port, drops one it does not know at all
    assert a.claim(30002, "pool-00000004", "web") and a.claim(30003, "gone-00000005", "web")
    assert a.sweep({"other"}, {30002}, now=time.time() + 3600) == [30003]
    assert a.holder(30002) is not None
    # a home that is gone loses its claims to whoever needs the port
    import shutil

    shutil.rmtree(homes[0])
    assert b.claim(30002, "box-b-00000006", "web")
    assert b.holder(30002)["owner"] == "box-b-00000006"
