"""Supervisors forked from the home's zygote (services/zygote.py): they work as spawned ones do,
share the zygote's memory, and a zygote that is gone, stale or ended leaves `new` working."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from helpers import CORE_TOML, Running, wait_for

from worktreebox.services import client, zygote
from worktreebox.system import cgroups, procfs, procs

pytestmark = pytest.mark.slow

PY = sys.executable
SERVICE_TOML = CORE_TOML + f"""
[box]
ports = ["web"]

[services.web]
cmd = "{PY} -m http.server $PORT --bind 127.0.0.1"
ready = "http://127.0.0.1:{{{{ ports.web }}}}/"
"""


@pytest.fixture
def running(wtbox_home):
    z = Running(wtbox_home)
    yield z
    z.end()


def _forked(pid: int) -> bool:
    return "worktreebox.services.zygote" in " ".join(procfs.cmdline(pid))


def _shared_dirty_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Shared_Dirty:"):
            return int(line.split()[1])
    return 0


def _ignored(pid: int, sig: int) -> bool:
    mask = next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("SigIgn:"))
    return bool(int(mask, 16) & (1 << (sig - 1)))


def _umask(pid: int) -> int:
    return int(next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("Umask:")), 8)


def _get(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
        return r.status


def test_a_forked_supervisor_runs_the_box_as_a_spawned_one_does(make_repo, host, running, run_wtbox):
    if cgroups.for_home(host.home) is None:
        pytest.skip("a supervisor is forked only where its box has a cgroup")
    repo = make_repo(toml=SERVICE_TOML)
    box = host.new("forked", repo=repo)
    sup = client.supervisor_pid(box)
    assert sup is not None and _forked(sup), procfs.cmdline(sup or 0)
    # the zygote's modules are pages it shares: a spawned supervisor has no shared dirty memory
    assert _shared_dirty_kb(sup) > 1024
    # as a fresh Python: SIGPIPE ignored (a write to a closed socket raises instead of ending it)
    assert _ignored(sup, signal.SIGPIPE) and not _ignored(sup, signal.SIGTERM)
    # the caller's umask, as a spawned supervisor inherits it (its services' files are made with it)
    assert _umask(sup) == 0o022 == os.umask(os.umask(0o022))
    assert sup in {p.pid for p in procs.find_box_processes(box.id, box.dir)}  # found by its box's cgroup
    assert _get(box.ports["web"]) == 200  # its service, through its forward where sandboxed
    state = client.read_state(box)
    assert state is not None and state.services["web"].state == "ready"

    # kill -9: the box is degraded, `up` starts a new supervisor (forked again), the service answers
    os.kill(sup, signal.SIGKILL)
    assert wait_for(lambda: client.supervisor_pid(box) is None, timeout=10), "the supervisor's end"
    run_wtbox("up", box.id)  # (a command of its own, as a user's: the zygote serves it too)
    again = client.supervisor_pid(box)
    assert again is not None and again != sup and _forked(again)
    assert wait_for(lambda: _get(box.ports["web"]) == 200, timeout=20), "the service again"

    host.rm(box.id, force=True)
    assert not procs.pid_alive(again)
    assert procs.find_box_processes(box.id, box.dir) == []
    assert procs.pid_alive(running.pid)  # the zygote serves the next box


def test_a_stale_socket_or_a_zygote_that_refuses_leaves_new_working(make_repo, host, running):
    repo = make_repo(toml=SERVICE_TOML)
    # the zygote killed: its socket stays, nobody answers; the supervisor starts as its own Python
    os.kill(running.pid, signal.SIGKILL)
    wait_for(lambda: not procs.pid_alive(running.pid), timeout=10)
    assert running.socket.exists()
    box = host.new("stale", repo=repo)
    sup = client.supervisor_pid(box)
    assert sup is not None and not _forked(sup)
    assert "worktreebox.services.supervisor" in procfs.cmdline(sup)
    assert _get(box.ports["web"]) == 200
    host.rm(box.id, force=True)


def _ask_while_code_changed(home: Path) -> zygote.Forked | None:
    """A supervisor asked of the zygote while a module of wtbox looks edited (its mtime moved on: any
    module, not only the zygote's), for a moment only: every CLI server and zygote of the tests
    running beside this one sees it too."""
    target = Path(zygote.__file__).with_name("spec.py")
    st = target.stat()
    try:
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
        return zygote.fork_supervisor(home, "nobox-0000cafe", env={}, cwd="/", fds=[])
    finally:
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.serial  # it changes wtbox's code for every server and zygote running beside it
def test_changed_code_makes_the_zygote_refuse_and_end(make_repo, host, running):
    repo = make_repo(toml=SERVICE_TOML)
    asked = _ask_while_code_changed(host.home)
    assert asked is None  # refused: the caller starts the supervisor itself
    assert wait_for(lambda: not procs.pid_alive(running.pid), timeout=10), "the zygote's end"
    assert "spec.py changed" in (host.home / "run" / zygote.LOG).read_text()
    assert not running.socket.exists()  # taken away: the next client does not wait on it
    box = host.new("changed", repo=repo)
    sup = client.supervisor_pid(box)
    assert sup is not None and not _forked(sup)  # started as its own Python, with the code as it is now
    assert _get(box.ports["web"]) == 200
    host.rm(box.id, force=True)


@pytest.mark.serial  # it changes wtbox's code for every server and zygote running beside it
def test_a_caller_whose_server_checked_its_code_is_served_the_code_it_runs(host, running, monkeypatch):
    """A served command carries the digest of the code its server checked as it forked it; the
    zygote serves it without walking the files again, even when the disk changed since: the
    supervisor then runs the caller's code, as a fresh one started by that caller would have."""
    from worktreebox.system import codestamp

    monkeypatch.setitem(codestamp._CHECKED, "digest", codestamp.digest(codestamp.code_stamp()))
    asked = _ask_while_code_changed(host.home)
    assert asked is not None  # a launcher, forked (it fails later: there is no such box)
    asked.stdin.close()
    asked.wait()
    assert procs.pid_alive(running.pid)  # the zygote serves on


def test_the_zygote_ends_with_its_server_and_refuses_another_uid(wtbox_home, running):
    import socket

    from worktreebox.system import unixsock

    # another uid: refused without an answer (the connection closes)
    code = ("import os, socket, sys; from worktreebox.system import unixsock; os.setuid(65534); "
            "s = socket.socket(socket.AF_UNIX); unixsock.connect(s, sys.argv[1]); "
            "unixsock.send(s, {'op': 'supervisor'}); print(s.recv(10))")
    out = subprocess.run([PY, "-c", code, str(running.socket)], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 or out.stdout.strip() == "b''", out  # its uid may not even reach the socket
    # a malformed request from us: refused in one message, the zygote goes on
    s = socket.socket(socket.AF_UNIX)
    unixsock.connect(s, str(running.socket))
    unixsock.send(s, {"op": "something else"})
    msg, _ = unixsock.recv(s)
    s.close()
    assert "refused" in msg and procs.pid_alive(running.pid)
    running.end()  # the server's end of the pipe closes
    assert not procs.pid_alive(running.pid)
    assert "its CLI server ended" in (wtbox_home / "run" / zygote.LOG).read_text()


def test_a_served_new_gets_a_forked_supervisor(make_repo, wtbox_home):
    """The CLI server starts the home's zygote: a served `wtbox new` forks its box's supervisor."""
    repo = make_repo(toml=SERVICE_TOML)
    env = {**os.environ, "WTBOX_HOME": str(wtbox_home), "WTBOX_NO_AUTO_GC": "1"}
    env.pop("WTBOX_NO_SERVER", None)
    launcher = [PY, "-m", "worktreebox.cli.launcher"]
    (wtbox_home / "boxes").mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen([PY, "-P", "-m", "worktreebox.cli.server", str(wtbox_home)], env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        assert wait_for((wtbox_home / "run" / zygote.SOCKET).exists, timeout=30, every=0.05)
        r = subprocess.run([*launcher, "new", "served", "--repo", str(repo), "--json"], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        box = json.loads(r.stdout)
        pid = int((Path(box["dir"]) / "run" / client.PID_FILE).read_text().split()[0])
        if cgroups.for_home(wtbox_home) is not None:
            assert _forked(pid)
        assert _get(box["ports"]["web"]) == 200
        r = subprocess.run([*launcher, "rm", "--force", box["id"]], env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
    finally:
        server.terminate()
        server.wait(10)
    zygotes = [p for p in procfs.pids() if "worktreebox.services.zygote" in " ".join(procfs.cmdline(p))
               and str(wtbox_home) in " ".join(procfs.cmdline(p))]
    assert wait_for(lambda: not any(procs.pid_alive(p) for p in zygotes), timeout=10), "the zygote outlived its server"
