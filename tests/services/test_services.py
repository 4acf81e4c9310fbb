"""Per-box services with real processes: supervisor, readiness, restarts, teardown, logs, secrets."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from helpers import APPS, CORE_TOML

from worktreebox.errors import WtboxError

PY = sys.executable
WORKER = (APPS / "worker.py").read_text()
DAEMON = (APPS / "daemon.py").read_text()

TWO_SERVICES = CORE_TOML + f"""
[box]
ports = ["web"]

[services.web]
cmd = "{PY} -m http.server {{{{ ports.web }}}} --bind 127.0.0.1"
ready = "http://127.0.0.1:{{{{ ports.web }}}}/"
ready_timeout = "20s"

[services.worker]
cmd = "{PY} -u worker.py"
depends_on = ["web"]
"""


def box_processes(box_id: str, *, services_only: bool = False) -> list[int]:
    """Every live process that carries WTBOX_ID=<box_id> (psutil over all processes); with
    `services_only`, those the box's services started (a sandboxed box's holder, network helper and
    supervisor run as long as the box does)."""
    pids = []
    for p in psutil.process_iter():
        try:
            env = p.environ() if p.status() != psutil.STATUS_ZOMBIE else {}
            if env.get("WTBOX_ID") == box_id and (not services_only or env.get("WTBOX_SERVICE")):
                pids.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return pids


def host_pid(box_id: str, pid: int) -> int:
    """The host's pid of a process of the box that knows itself as `pid` (in a sandboxed box's own
    pid namespace; the same number without a sandbox)."""
    for p in box_processes(box_id):
        try:
            nspid = next(line.split()[1:] for line in open(f"/proc/{p}/status") if line.startswith("NSpid:"))
        except (OSError, StopIteration):
            continue
        if int(nspid[-1]) == pid:
            return p
    return pid


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def wait_for(pred, timeout=15.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        val = pred()
        if val:
            return val
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def logs_json(run_wtbox, box_id, *args):
    out = run_wtbox("logs", box_id, "--json", *args).stdout
    return [json.loads(line) for line in out.splitlines()]  # every stdout line is one record


@pytest.fixture
def two_service_box(make_repo, run_wtbox, wtbox_home):
    repo = make_repo({"worker.py": WORKER}, toml=TWO_SERVICES)
    secret = "canary-" + os.urandom(8).hex()
    proc = run_wtbox("new", "svc", "--repo", str(repo), "--secret", "CANARY", "--json", env={"CANARY": secret})
    box = json.loads(proc.stdout)
    yield box, secret
    run_wtbox("rm", "--force", box["id"], check=False)


def test_two_service_box_ready_answers_and_rm_leaves_nothing(two_service_box, run_wtbox):
    box, _ = two_service_box
    port = box["ports"]["web"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/worker.py", timeout=5) as r:
        assert r.status == 200 and b"inbox" in r.read()

    status = json.loads(run_wtbox("status", box["id"], "--json").stdout)
    services = {s["name"]: s for s in status["services"]}
    assert set(services) == {"web", "worker"}
    for s in services.values():
        assert s["state"] == "ready" and psutil.pid_exists(s["pid"]) and s["restarts"] == 0
        assert s["ready_seconds"] is not None and s["ready_at"]
    assert services["web"]["port"] == port
    # depends_on: the worker started only after web was ready
    assert services["worker"]["started_at"] >= services["web"]["ready_at"]
    pids = box_processes(box["id"])
    assert services["web"]["pid"] in pids and services["worker"]["pid"] in pids

    run_wtbox("rm", "--force", box["id"])
    assert box_processes(box["id"]) == []
    assert port_free(port)


def test_logs_filters_json_and_traceback(two_service_box, run_wtbox):
    box, _ = two_service_box
    wait_for(lambda: any(r["msg"] == "after traceback" for r in logs_json(run_wtbox, box["id"], "-s", "worker")),
             what="the worker's output")
    worker = logs_json(run_wtbox, box["id"], "--service", "worker")
    assert {r["service"] for r in worker} == {"worker"}
    assert all(set(r) >= {"ts", "service", "stream", "level", "msg"} for r in worker)
    tracebacks = [r for r in worker if "Traceback" in r["msg"]]
    assert len(tracebacks) == 1
    tb = tracebacks[0]
    assert tb["level"] == "error" and tb["stream"] == "stderr"
    assert tb["msg"].startswith("Traceback (most recent call last):")
    assert tb["msg"].endswith("ValueError: worker failed on purpose")
    assert not any(r["msg"].startswith("  File") for r in worker)  # no frame leaked into its own record

    warn = logs_json(run_wtbox, box["id"], "--level", "warning", "-s", "worker")
    assert {r["level"] for r in warn} <= {"warning", "error", "critical"}
    assert {"WARNING queue is getting long", '{"level": "error", "msg": "json error line"}'} <= \
        {r["msg"] for r in warn}
    assert "DEBUG polling" not in {r["msg"] for r in warn}

    grep = logs_json(run_wtbox, box["id"], "--grep", r"queue is \w+ long")
    assert [r["msg"] for r in grep] == ["WARNING queue is getting long"]
    web = logs_json(run_wtbox, box["id"], "-s", "web")
    assert web and {r["service"] for r in web} == {"web"}
    both = logs_json(run_wtbox, box["id"], "-s", "web", "-s", "worker")
    assert {r["service"] for r in both} == {"web", "worker"}
    assert [r["ts"] for r in both] == sorted(r["ts"] for r in both)

    assert logs_json(run_wtbox, box["id"], "--since", "2099-01-01T00:00:00Z") == []
    assert logs_json(run_wtbox, box["id"], "--since", "10m", "-s", "worker") != []
    assert logs_json(run_wtbox, box["id"], "--until", "2000-01-01T00:00:00Z") == []
    assert len(logs_json(run_wtbox, box["id"], "--tail", "3")) == 3

    human = run_wtbox("logs", box["id"], "-s", "worker", "--grep", "queue").stdout
    assert "worker" in human and "WARNING queue is getting long" in human
    bad = run_wtbox("logs", box["id"], "-s", "nosuch", check=False)
    assert bad.returncode == 2 and "nosuch" in bad.stderr and bad.stdout == ""


def test_follow_sees_a_line_written_after_it_started(two_service_box, wtbox_home):
    box, _ = two_service_box
    env = {**os.environ, "WTBOX_HOME": str(wtbox_home)}
    follower = subprocess.Popen([PY, "-m", "worktreebox.cli.main", "logs", box["id"], "--follow", "--json",
                                 "-s", "worker"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        time.sleep(1.0)  # let it start and print its tail
        marker = "marker-" + os.urandom(4).hex()
        (Path(box["path"]) / "inbox").write_text(marker + "\n")
        deadline = time.time() + 15
        seen = None
        while time.time() < deadline:
            line = follower.stdout.readline()
            if not line:
                break
            rec = json.loads(line)
            if rec["msg"] == marker:
                seen = rec
                break
        assert seen is not None and seen["service"] == "worker" and seen["stream"] == "stdout"
    finally:
        follower.terminate()
        follower.wait(timeout=10)


def test_secret_reaches_the_service_and_nothing_else(two_service_box, run_wtbox, wtbox_home):
    box, secret = two_service_box
    wait_for(lambda: any(r["msg"] == "after traceback" for r in logs_json(run_wtbox, box["id"], "-s", "worker")),
             what="the worker's output")
    msgs = [r["msg"] for r in logs_json(run_wtbox, box["id"])]
    # The service received the value (it printed its hash) ...
    assert f"canary sha256 {hashlib.sha256(secret.encode()).hexdigest()}" in msgs
    # ... and printed it, masked before anything was written.
    assert "the secret is *** (should be masked)" in msgs and "stderr also masks ***" in msgs
    # `wtbox exec` gets it too, from the supervisor's memory.
    out = run_wtbox("exec", box["id"], "--", "sh", "-c", 'echo "$CANARY"').stdout.strip()
    assert out == secret
    # Not on disk anywhere under $WTBOX_HOME (registry, env file, state, services.json, logs) ...
    needle = secret.encode()
    for path in wtbox_home.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert needle not in path.read_bytes(), path
    # ... nor in what ls/status print.
    for args in (("ls", "--json"), ("status", box["id"], "--json"), ("status", box["id"]), ("env", box["id"])):
        assert secret not in run_wtbox(*args).stdout
    assert secret not in (Path(box["dir"]) / "run" / "state.json").read_text()


def test_a_secret_given_only_to_up_reaches_exec_and_a_box_given_none_is_not_asked(make_repo, run_wtbox, monkeypatch,
                                                                                  host):
    """`exec` asks the supervisor for the --secret values only where some were given: by `new`, or by an
    `up` that started it anew since (its names are recorded as `new`'s are)."""
    from worktreebox.services import client

    repo = make_repo(toml=CORE_TOML + '[services.idle]\ncmd = "sleep 600"\n')
    box = json.loads(run_wtbox("new", "nosecret", "--repo", str(repo), "--json").stdout)
    asked = []
    monkeypatch.setattr(client, "box_secrets", lambda b: asked.append(b.id) or {})
    assert host.running_secrets(host.get(box["id"])) == {} and asked == []
    monkeypatch.undo()
    secret = "later-" + os.urandom(8).hex()
    b = host.get(box["id"])
    os.kill(client.supervisor_pid(b), signal.SIGKILL)  # `up --secret` is for a supervisor started anew
    wait_for(lambda: client.supervisor_pid(b) is None, what="the supervisor's end")
    run_wtbox("up", box["id"], "--secret", "LATER", env={"LATER": secret})
    assert run_wtbox("exec", box["id"], "--", "sh", "-c", 'echo "$LATER"').stdout.strip() == secret
    run_wtbox("rm", "--force", box["id"])


def test_crashing_service_is_restarted_and_counted_and_up_down_restart(make_repo, host, run_wtbox):
    toml = CORE_TOML + """
[services.flaky]
cmd = "echo flaky starting; sleep 0.4; echo 'ERROR giving up' >&2; exit 3"

[services.steady]
cmd = "sleep 600"
"""
    repo = make_repo(toml=toml)
    box = host.new("crash", repo=repo)
    try:
        def restarts():
            st = json.loads(run_wtbox("status", box.id, "--json").stdout)
            return {s["name"]: s for s in st["services"]}["flaky"]["restarts"] >= 2

        wait_for(restarts, timeout=20, what="two restarts")
        events = logs_json(run_wtbox, box.id, "-s", "flaky", "--grep", "exited with code 3")
        assert len(events) >= 2 and all(e["level"] == "error" for e in events)
        assert len(logs_json(run_wtbox, box.id, "-s", "flaky", "--grep", "restarting in")) >= 2

        out = json.loads(run_wtbox("down", box.id, "steady", "--json").stdout)
        steady = {s["name"]: s for s in out["services"]}["steady"]
        assert steady["state"] == "stopped" and steady["pid"] is None
        out = json.loads(run_wtbox("up", box.id, "steady", "--json").stdout)
        steady2 = {s["name"]: s for s in out["services"]}["steady"]
        assert steady2["state"] == "ready" and steady2["pid"]
        out = json.loads(run_wtbox("restart", box.id, "steady", "--json").stdout)
        steady3 = {s["name"]: s for s in out["services"]}["steady"]
        assert steady3["state"] == "ready" and steady3["pid"] != steady2["pid"]
        assert not psutil.pid_exists(steady2["pid"]) or psutil.Process(steady2["pid"]).status() == "zombie"
        bad = run_wtbox("up", box.id, "nosuch", check=False)
        assert bad.returncode == 2 and "nosuch" in bad.stderr

        # down for all stops every service; up brings everything back.
        run_wtbox("down", box.id)
        assert box_processes(box.id, services_only=True) == []
        out = json.loads(run_wtbox("up", box.id, "--json").stdout)
        assert {s["name"]: s for s in out["services"]}["steady"]["state"] == "ready"
    finally:
        host.rm(box.id, force=True)
    assert box_processes(box.id) == []


def test_a_service_whose_check_is_answered_with_an_error_says_what_the_check_saw(make_repo, host):
    """A server that answers the check's GET with 501 (http.server's base handler has no do_GET) is
    not ready; `new` says what the check saw, not only that time ran out."""
    server = ("import http.server, os\n"
              "http.server.HTTPServer(('127.0.0.1', int(os.environ['PORT'])),"
              " http.server.BaseHTTPRequestHandler).serve_forever()\n")
    toml = CORE_TOML + f"""
[box]
ports = ["web"]

[services.web]
cmd = "{sys.executable} server.py"
ready = "http://127.0.0.1:{{{{ ports.web }}}}/"
ready_timeout = "1.5s"
"""
    repo = make_repo({"server.py": server}, toml=toml)
    with pytest.raises(WtboxError) as err:
        host.new("answers-501", repo=repo)
    assert "not ready after 1.5s: GET http://127.0.0.1:" in str(err.value), str(err.value)
    assert "answered 501" in str(err.value)
    assert host.list() == []


def test_never_ready_service_fails_new_with_its_last_lines_and_leaves_nothing(make_repo, host, wtbox_home):
    toml = CORE_TOML + """
[box]
ports = ["web"]

[services.web]
cmd = "echo booting; echo 'ERROR cannot bind the port: it is a test' >&2; sleep 600"
ready = "tcp:{{ ports.web }}"
ready_timeout = "1.5s"
"""
    repo = make_repo(toml=toml)
    with pytest.raises(WtboxError) as err:
        host.new("never", repo=repo)
    msg = str(err.value)
    assert "'web'" in msg and "not ready after 1.5s" in msg
    assert "ERROR cannot bind the port: it is a test" in msg and "booting" in msg
    assert host.list() == []
    assert list((wtbox_home / "boxes").iterdir()) == []
    assert not any(box_id.startswith("never-") for box_id in _all_box_ids())


def test_a_service_that_exits_at_once_fails_new_fast_with_its_exit_code(make_repo, host):
    """Defect 2: `exit 3` made `new` wait the whole ready timeout (60 s) and print the same output once
    per restart, never the exit code."""
    toml = CORE_TOML + """
[box]
ports = ["web"]

[services.web]
cmd = "echo starting up; exit 3"
ready = "tcp:{{ ports.web }}"
"""
    repo = make_repo(toml=toml)
    t0 = time.monotonic()
    with pytest.raises(WtboxError) as err:
        host.new("exits", repo=repo)
    took = time.monotonic() - t0
    msg = str(err.value)
    assert took < 15, f"new took {took:.1f}s to give up on a service that exits at once"
    assert "exited with code 3" in msg and msg.count("starting up") == 1, msg
    assert host.list() == []


def _all_box_ids() -> set[str]:
    ids = set()
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and p.environ().get("WTBOX_ID"):
                ids.add(p.environ()["WTBOX_ID"])
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return ids


def test_double_forked_daemon_dies_with_rm(make_repo, host, tmp_path):
    toml = CORE_TOML + f"""
[services.spawner]
cmd = "{PY} daemon.py $TMPDIR/daemon.pid"
"""
    repo = make_repo({"daemon.py": DAEMON}, toml=toml)
    box = host.new("daemon", repo=repo)
    pidfile = box.tmp_dir / "daemon.pid"  # the box's own temp dir (its /tmp is a tmpfs of its own)
    daemon_pid = host_pid(box.id, int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), what="the daemon")))
    daemon = psutil.Process(daemon_pid)
    # It really escaped: another session, not in the box dir; only WTBOX_ID ties it to the box.
    assert os.getsid(daemon_pid) != os.getsid(host.resource("services").status(host, box)["services"][0]["pid"])
    assert daemon.cwd() == "/"
    assert daemon.environ()["WTBOX_ID"] == box.id
    host.rm(box.id, force=True)
    assert not daemon.is_running() or daemon.status() == psutil.STATUS_ZOMBIE
    assert box_processes(box.id) == []


def test_setup_failure_rolls_back_with_last_lines(make_repo, host, wtbox_home):
    toml = CORE_TOML + """
[setup]
cmd = "echo installing; echo 'pip: no matching distribution for nosuchpkg' >&2; exit 4"

[services.web]
cmd = "sleep 600"
"""
    repo = make_repo(toml=toml)
    with pytest.raises(WtboxError) as err:
        host.new("setupfail", repo=repo)
    assert "exit code 4" in str(err.value) and "no matching distribution for nosuchpkg" in str(err.value)
    assert host.list() == [] and list((wtbox_home / "boxes").iterdir()) == []


def test_no_services_flag_and_setup_log(make_repo, host, run_wtbox):
    toml = CORE_TOML + """
[setup]
cmd = "echo setup ran in $WTBOX_ID"

[services.web]
cmd = "sleep 600"
"""
    repo = make_repo(toml=toml)
    with host.new("nosvc", repo=repo, start_services=False) as box:
        assert box_processes(box.id, services_only=True) == []
        setup = logs_json(run_wtbox, box.id, "-s", "setup")
        assert [r["msg"] for r in setup] == [f"setup ran in {box.id}"]
        # `up` renders the services from the box's wtbox.toml and starts them later.
        out = json.loads(run_wtbox("up", box.id, "--json").stdout)
        assert [(s["name"], s["state"]) for s in out["services"]] == [("web", "ready")]
        assert box_processes(box.id)
    assert box_processes(box.id) == []


def test_procfile_services_get_port(make_repo, host):
    procfile = f"web: {PY} -m http.server $PORT --bind 127.0.0.1\n"
    repo = make_repo({"Procfile": procfile}, toml=CORE_TOML)
    with host.new("procfile", repo=repo) as box:
        port = box.ports["web"]

        def answers():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/Procfile", timeout=2) as r:
                    return r.read().decode() == procfile
            except OSError:
                return False

        assert wait_for(answers, what="the Procfile web service")
        (row,) = host.resource("services").status(host, box)["services"]
        assert row["name"] == "web" and row["port"] == port and row["state"] == "ready"
    assert box_processes(box.id) == [] and port_free(port)


def test_stop_is_staged_term_then_kill(make_repo, host, monkeypatch, run_wtbox):
    monkeypatch.setenv("WTBOX_KILL_WAIT", "1")  # inherited by the supervisor
    toml = CORE_TOML + """
[services.stubborn]
cmd = "trap 'echo got TERM, ignoring it' TERM; while true; do sleep 0.05; done"
"""
    box = host.new("stubborn", repo=make_repo(toml=toml))
    (row,) = host.resource("services").status(host, box)["services"]
    t0 = time.perf_counter()
    out = run_wtbox("down", box.id, "--json")
    took = time.perf_counter() - t0
    assert not psutil.pid_exists(row["pid"]) or psutil.Process(row["pid"]).status() == psutil.STATUS_ZOMBIE
    assert 1.0 <= took < 8, took
    assert json.loads(out.stdout)["services"][0]["state"] == "stopped"
    assert "got TERM, ignoring it" in [r["msg"] for r in logs_json(run_wtbox, box.id, "-s", "stubborn")]
    host.rm(box.id, force=True)
    assert box_processes(box.id) == []


@pytest.mark.slow
def test_control_socket_works_when_its_path_is_longer_than_sun_path(make_repo, tmp_path, monkeypatch):
    from worktreebox.host import Host
    from worktreebox.resources import services as svc

    home = tmp_path / ("h" * 60) / ("o" * 60) / "home"
    monkeypatch.setenv("WTBOX_HOME", str(home))
    h = Host(home)
    box = h.new("longpath", repo=make_repo(toml=CORE_TOML + '[services.app]\ncmd = "sleep 600"\n'))
    try:
        assert len(str(box.run_dir / "ctl.sock")) > 108
        before = svc.services_status(box)["app"]["pid"]
        after = svc.services_restart(h, box, "app")["app"]
        assert after["state"] == "ready" and after["pid"] != before
    finally:
        h.rm(box.id, force=True)
        h.registry.close()
    assert box_processes(box.id) == []


def test_a_python_services_print_reaches_the_logs_as_written(make_repo, run_wtbox):
    """Python block-buffers stdout into anything but a terminal: without PYTHONUNBUFFERED a
    service's print() would reach `wtbox logs` only at 8 KB or at its exit."""
    toml = CORE_TOML + f"""
[services.talker]
cmd = "{PY} -c 'import time; print(\\"hello from talker\\"); time.sleep(120)'"
"""
    box = json.loads(run_wtbox("new", "talk", "--repo", str(make_repo(toml=toml)), "--json").stdout)
    try:
        wait_for(lambda: any("hello from talker" in r.get("msg", "") for r in logs_json(run_wtbox, box["id"])),
                 timeout=20, what="the print in wtbox logs")
        env = run_wtbox("env", box["id"]).stdout
        assert "PYTHONUNBUFFERED=1" in env
    finally:
        run_wtbox("rm", "--force", box["id"], check=False)


def test_an_inherited_proxy_password_reaches_the_box_but_never_the_disk(make_repo, run_wtbox, wtbox_home):
    """A proxy URL with a password is inherited (the box's `uv sync` needs it) like a --secret:
    held in memory by the box's supervisor, its name recorded, its value in no file."""
    secret = "pw" + os.urandom(6).hex()
    proxy = f"http://user:{secret}@proxy.invalid:3128"
    toml = CORE_TOML + f"""
[services.idle]
cmd = "{PY} -c 'import time; time.sleep(600)'"
"""
    repo = make_repo(toml=toml)
    box = json.loads(run_wtbox("new", "proxied", "--repo", str(repo), "--json", env={"HTTPS_PROXY": proxy}).stdout)
    try:
        out = run_wtbox("exec", box["id"], "--", "sh", "-c", 'printf %s "$HTTPS_PROXY"', env={"HTTPS_PROXY": ""}).stdout
        assert out == proxy
        leaked = [str(p) for p in wtbox_home.rglob("*")
                  if p.is_file() and not p.is_symlink() and secret.encode() in p.read_bytes()]
        assert leaked == []
    finally:
        run_wtbox("rm", "--force", box["id"], check=False)


def _listening_inode(port: int) -> str:
    """The inode of the host's listening socket on 127.0.0.1:<port> (/proc/net/tcp, state 0A)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":
            return fields[9]
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} in the host's network")


def _holders(inode: str) -> set[int]:
    held = set()
    for p in psutil.process_iter():
        try:
            fds = os.listdir(f"/proc/{p.pid}/fd")
            if any(os.readlink(f"/proc/{p.pid}/fd/{fd}") == f"socket:[{inode}]" for fd in fds):
                held.add(p.pid)
        except OSError:
            continue
    return held


def test_only_the_supervisor_holds_a_sandboxed_boxs_host_ports(make_repo, host, tmp_path):
    """A sandboxed box's forwards listen on host sockets its supervisor inherited: no process it
    starts (a service, a daemon that outlives the supervisor) holds one, so a dead supervisor
    leaves the host's port free for the next (what the old output keeper's close_fds was for)."""
    toml = CORE_TOML + f"""
[box]
ports = ["web"]

[services.spawner]
cmd = "{PY} daemon.py $TMPDIR/daemon.pid"
"""
    repo = make_repo({"daemon.py": DAEMON}, toml=toml)
    box = host.new("holders", repo=repo)
    if not (box.data.get("sandbox") or {}).get("ports"):
        pytest.skip("this home's boxes are not sandboxed")
    pidfile = box.tmp_dir / "daemon.pid"
    daemon = host_pid(box.id, int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), what="the daemon")))
    supervisor = int((box.run_dir / "supervisor.pid").read_text().split()[0])
    inode = _listening_inode(box.ports["web"])
    assert _holders(inode) == {supervisor}
    os.kill(supervisor, 9)
    # (its threads may still be ending while its main one is a zombie: the socket goes with the last)
    wait_for(lambda: not psutil.pid_exists(supervisor) or not _holders(inode), what="the supervisor's end")
    assert psutil.pid_exists(daemon)  # it outlived the supervisor
    assert _holders(inode) == set()  # nobody kept the host's socket (its release may lag the exit a moment)
    wait_for(lambda: port_free(box.ports["web"]), timeout=5, what="the host's port free")
    host.rm(box.id, force=True)
