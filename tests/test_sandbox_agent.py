"""An agent inside box A, with box B of the same repo running (issue 26's table, through real boxes).

Everything goes through wtbox as a user drives it: `Host.new`, the captured exec that MCP's
box_exec is (operations.boxes.run), `net`, `rm`. B runs a web service on the same fixed port as
A's (3000 inside both), has a --secret, a database role and schema of its own, a metrics store
and an OTLP endpoint. What A tries is what agents try.
"""
from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from helpers import wait_for
from sandbox_helpers import needs_sandbox_tools

from worktreebox.operations import boxes as box_ops
from worktreebox.system import cgroups, procs

pytestmark = [needs_sandbox_tools(), pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="the root-mode sandbox")]

PY = sys.executable
SECRET = "b-secret-7f3a9c"
# A service that binds the same fixed port in every box and names its database as apps do:
# localhost:5432, the user and password from libpq's variables.
APP = '''
import http.server, os, psycopg, sys

def db():
    return psycopg.connect(host="localhost", port=5432, user=os.environ["PGUSER"],
                           password=os.environ["PGPASSWORD"], dbname=os.environ["PGDATABASE"], autocommit=True)

with db() as c:
    c.execute("CREATE TABLE IF NOT EXISTS notes (text text)")

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/add/"):
            with db() as c:
                c.execute("INSERT INTO notes VALUES (%s)", (self.path[5:],))
        if self.path == "/who":
            body = open("who.txt").read() if os.path.exists("who.txt") else "nobody"
        else:
            with db() as c:
                body = ",".join(r[0] for r in c.execute("SELECT text FROM notes ORDER BY text"))
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", 3000), H).serve_forever()
'''
TOML = f'''
[box]
ports = {{ web = 3000 }}

[database]
mode = "schema"

[services.web]
cmd = "{PY} app.py"
ready = "http://127.0.0.1:{{{{ ports.web }}}}/who"
'''


@pytest.fixture(scope="module")
def pair(shared_postgres):
    """Boxes A and B of one repo, each with its web service on 3000 inside and a who.txt naming it.
    The home is not under /tmp, as a user's is not: a box's /tmp is a tmpfs of its own, and a home
    below /tmp has its box's binds inside it (`rm -rf /tmp/*` in the box would reach its worktree)."""
    import shutil
    import tempfile

    from helpers import git, remove_all_boxes

    from worktreebox.host import Host

    base = Path(tempfile.mkdtemp(prefix="wtbox-agent-", dir="/var/tmp"))
    repo = base / "repo"
    repo.mkdir()
    (repo / "app.py").write_text(APP)
    (repo / ".gitignore").write_text("who.txt\n")  # each box writes its own, unsaved work it is not
    (repo / "wtbox.toml").write_text(TOML)
    for args in (("init", "-q", "-b", "main"), ("config", "user.email", "t@e"), ("config", "user.name", "T"),
                 ("add", "-A"), ("commit", "-qm", "app")):
        git(repo, *args)
    saved = {k: os.environ.get(k) for k in ("WTBOX_HOME", "WTBOX_NO_AUTO_GC", "WTBOX_PORT_RANGE")}
    os.environ.update(WTBOX_HOME=str(base / "home"), WTBOX_NO_AUTO_GC="1", WTBOX_PORT_RANGE="27000-27099")
    host = Host(base / "home")
    try:
        made = []
        for name, secrets in (("agent-a", {}), ("agent-b", {"B_TOKEN": SECRET})):
            box = host.new(name, repo=repo, secrets=secrets)
            (box.path / "who.txt").write_text(box.id)
            made.append(box)
        yield host, made[0], made[1], base
    finally:
        from worktreebox.providers.mounts.base import unmount_all

        remove_all_boxes(host)
        unmount_all(base, include_root=True)  # boxes/, shared for the sandboxes
        shutil.rmtree(base, ignore_errors=True)
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def in_box(host, box, cmd: str, timeout: float = 30) -> dict:
    """What an agent's `box_exec` gets: the command run in the box, captured."""
    return box_ops.run(host, box.id, cmd, timeout=timeout, tail=5000, show_secrets=True)


def get(port: int, path: str = "/who", timeout: float = 5) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return r.read().decode()


def restarts(host, box) -> int:
    rows = host.resource("services").status(host, box)["services"]
    return next(r["restarts"] for r in rows if r["name"] == "web")


def service_pid(host, box) -> int:
    return next(r["pid"] for r in host.resource("services").status(host, box)["services"] if r["name"] == "web")


# ---------------------------------------------------------------- the table of issue 26, row by row

def test_a_sees_only_its_own_processes(pair):
    host, a, _b, _ = pair
    seen = in_box(host, a, "ps -eo args=")["stdout"].splitlines()
    assert sum(line.endswith(" app.py") and not line.startswith("/bin/sh") for line in seen) == 1, seen  # not B's
    assert not [line for line in seen if "supervisor" in line or "victoria" in line or "postgres" in line]
    host_side = len(psutil.pids())
    assert len(seen) < 12 < host_side


def test_a_reads_nothing_of_b(pair):
    host, a, b, _ = pair
    b_pid = service_pid(host, b)
    tries = {
        "env file": f"cat {b.dir}/env",
        "environ": f"cat /proc/{b_pid}/environ",
        "its dir": f"ls {b.dir}",
        "the registry": f"ls {host.home}/registry.sqlite3",
    }
    for what, cmd in tries.items():
        out = in_box(host, a, cmd)
        assert out["exit_code"] != 0 and SECRET not in out["stdout"], (what, out)
    assert SECRET not in in_box(host, a, "env; cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n'")["stdout"]


def test_a_cannot_write_into_b(pair):
    host, a, b, _ = pair
    out = in_box(host, a, f"echo pwned > {b.path}/pwned.txt")
    assert out["exit_code"] != 0
    assert not (b.path / "pwned.txt").exists()
    assert host.unsaved_work(b) is None  # B's rm is not refused because of A


def test_a_reaches_none_of_bs_services_nor_the_hosts(pair, shared_postgres):
    host, a, b, _ = pair
    targets = {"B's web": b.ports["web"], "B's metrics": b.ports["metrics"], "B's OTLP": b.ports["otlp"],
               "the database server": shared_postgres.port}
    for what, port in targets.items():
        out = in_box(host, a, f"curl -s -m 3 -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{port}/")
        assert out["stdout"] == "000", (what, out)
        out = in_box(host, a, f"curl -s -m 3 -o /dev/null -w '%{{http_code}}' http://10.0.2.2:{port}/")
        assert out["stdout"] == "000", (what, "through the gateway", out)
    # its own, at the canonical local addresses
    assert in_box(host, a, "curl -s -m 3 http://127.0.0.1:3000/who")["stdout"] == a.id
    health = "curl -s -m 3 -o /dev/null -w '%{http_code}' http://127.0.0.1:8428/health"
    assert in_box(host, a, health)["stdout"] == "200"


def test_a_gets_no_superuser_session(pair, shared_postgres):
    host, a, _, _ = pair
    out = in_box(host, a, f"psql -h {shared_postgres.cluster.socket_dir} -U postgres -c 'select 1'")
    assert out["exit_code"] != 0
    out = in_box(host, a, f"psql -h 10.0.2.2 -p {shared_postgres.port} -U postgres -c 'select 1'")
    assert out["exit_code"] != 0


def test_a_cannot_leave_its_cgroup_or_mount(pair):
    host, a, b, _ = pair
    backend = cgroups.for_home(host.home)
    if backend is not None:
        theirs = backend.box_dirs(b.id, "_exec")[0]
        assert in_box(host, a, f"mkdir -p {theirs} 2>/dev/null; echo $$ > {theirs}/cgroup.procs")["exit_code"] != 0
        assert in_box(host, a, f"echo $$ > {backend.bases[0]}/cgroup.procs")["exit_code"] != 0
    assert in_box(host, a, "mkdir -p /tmp/m && mount -t tmpfs none /tmp/m")["exit_code"] != 0
    assert in_box(host, a, "nft flush ruleset")["exit_code"] != 0


def test_what_agents_type_to_free_a_port_leaves_b_untouched(pair):
    host, a, b, _ = pair
    before = restarts(host, b)
    a_port, b_port = a.ports["web"], b.ports["web"]
    for cmd in ("pkill -f 'app.py'", "killall -q python3", f"fuser -k 3000/tcp {b_port}/tcp",
                "rm -rf /tmp/* /tmp/.[!.]* 2>/dev/null; true", "kill -9 -1"):
        in_box(host, a, cmd)
    assert get(b_port) == b.id
    assert restarts(host, b) == before == 0
    assert (b.path / "who.txt").read_text() == b.id and (b.path / "app.py").exists()
    # A's own service was within reach; its supervisor (not in A's sight) brings it back
    assert wait_for(lambda: _answers(a_port), timeout=30)
    assert restarts(host, a) >= 1


def _answers(port: int) -> bool:
    try:
        get(port)
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- two boxes on the same port and localhost:5432

def test_two_boxes_bind_the_same_port_and_localhost_5432_each_with_its_own_data(pair):
    host, a, b, _ = pair
    assert a.inside_ports["web"] == b.inside_ports["web"] == 3000 and a.ports["web"] != b.ports["web"]
    env = host.exec_env(a)
    assert (env["PGHOST"], env["PGPORT"]) == ("127.0.0.1", "5432") and env["PORT"] == "3000"
    get(a.ports["web"], "/add/from-a")
    get(b.ports["web"], "/add/from-b")
    assert get(a.ports["web"], "/") == "from-a" and get(b.ports["web"], "/") == "from-b"


# ---------------------------------------------------------------- wtbox net

def p50(port: int, n: int = 9) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        get(port)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def test_net_delays_cuts_and_restores_one_box_only(pair):
    host, a, b, _ = pair
    from worktreebox.operations import network

    base_a, base_b = p50(a.ports["web"]), p50(b.ports["web"])
    network.net(host, a.id, delay="200ms")
    try:
        slow_a, same_b = p50(a.ports["web"]), p50(b.ports["web"])
        assert 0.150 <= slow_a - base_a <= 0.250, (base_a, slow_a)
        assert same_b - base_b < 0.05, (base_b, same_b)
        shown = host.describe(host.get(a.id))["sandbox"]["forwards"]["web"]["faults"]
        assert shown["delay_ms"] == 200
        network.net(host, a.id, down="db")
        query = "psql -c 'select 1' -tA"
        assert in_box(host, a, query)["exit_code"] != 0
        assert in_box(host, b, query)["stdout"].strip() == "1"
    finally:
        network.net(host, a.id, reset=True)
    assert in_box(host, a, "psql -c 'select 1' -tA")["stdout"].strip() == "1"
    assert p50(a.ports["web"]) - base_a < 0.05
    events = [e for e in map(json.loads, (a.logs_dir / "_events.jsonl").read_text().splitlines())
              if e.get("service") == "_net"]
    assert [e.get("reset") for e in events][-1] is True and len(events) >= 3


# ---------------------------------------------------------------- wtbox inside a box

def test_wtbox_inside_a_box_works_for_it_and_refuses_the_rest(pair):
    host, a, b, _ = pair
    wtbox = f"{shlex.quote(PY)} -m worktreebox.cli.launcher"
    status = in_box(host, a, f"{wtbox} status --json")
    assert status["exit_code"] == 0 and json.loads(status["stdout"])["id"] == a.id
    assert "web" in in_box(host, a, f"{wtbox} logs -n 5")["stdout"]
    for cmd, word in ((f"status {b.id}", "another box"), ("ls", "not available"), ("rm agent-b", "not available"),
                      (f"restart --secret X=@{b.dir}/env", "--secret")):
        out = in_box(host, a, f"{wtbox} {cmd}")
        assert out["exit_code"] == 2 and word in out["stderr"], (cmd, out)


# ---------------------------------------------------------------- after rm, nothing of A runs

def test_after_rm_nothing_of_a_runs(pair):
    host, _, b, _ = pair
    a = host.new("agent-c", repo=b.repo)  # a box of its own: the others serve the other tests
    in_box(host, a, "setsid sleep 1000 >/dev/null 2>&1 & cd / && env -i sleep 1001 >/dev/null 2>&1 & "
                    "nohup sleep 1002 >/dev/null 2>&1 & echo started")
    holder = json.loads((a.run_dir / "sandbox.json").read_text())["pid"]
    pidns = os.stat(f"/proc/{holder}/ns/pid").st_ino
    host.rm(a.id, force=True)
    left = [p.pid for p in psutil.process_iter() if _in_pidns(p.pid, pidns) and procs.pid_alive(p.pid)]
    assert [procs.describe(p) for p in left] == [] and procs.find_box_processes(a.id, a.dir) == []
    assert not any(a.id in " ".join(procs.cmdline(p)) for p in psutil.pids())


def _in_pidns(pid: int, ino: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino == ino
    except OSError:
        return False


def test_a_template_that_reaches_for_os_runs_nothing(tmp_path, host, make_repo):
    marker = tmp_path / "pwned"
    toml = ("[box]\nenv = { X = \"{{ lipsum.__globals__['os'].popen('touch " + str(marker) + "').read() }}\" }\n"
            "[database]\nmode = \"none\"\n[observability]\nenabled = false\n")
    from worktreebox.errors import ConfigError

    with pytest.raises(ConfigError, match=r"env\.X"):
        host.new("tmpl", repo=make_repo(toml=toml))
    assert not marker.exists()
