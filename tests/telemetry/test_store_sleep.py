"""A quiet box's store sleeps stopped (telemetry/store_sleep.py): a real box, a real VictoriaMetrics.

The supervisor puts a store to sleep after SLEEP_AFTER calm seconds; these tests put it to sleep
the same way (Store.sleep, what StoreSleep calls) without waiting for the clock, then read it as
a user does."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from helpers import wait_for

from worktreebox.providers.metrics import native as vm
from worktreebox.system import background, procs
from worktreebox.telemetry import store_sleep
from worktreebox.telemetry.vmclient import Client

pytestmark = pytest.mark.skipif(shutil.which("victoria-metrics") is None,
                                reason="victoria-metrics is not installed (Debian package victoria-metrics)")

BARE_TOML = '[database]\nmode = "none"\n'  # a store, the OTLP endpoint in the supervisor, no service


@pytest.fixture(autouse=True)
def own_port_range(monkeypatch):
    lo = random.randrange(21000, 29000, 100)
    monkeypatch.setenv("WTBOX_PORT_RANGE", f"{lo}-{lo + 99}")


def _push_and_keep(url: str, text: str) -> None:
    urllib.request.urlopen(urllib.request.Request(url + "/api/v1/import/prometheus", data=text.encode()), timeout=5)
    Client(url).flush()


def _store_pids(box_id: str) -> list[int]:
    return [p.pid for p in vm.find_processes(box_id)]


def _sleep_once_calm(store: store_sleep.Store, box_id: str) -> None:
    """Put the store to sleep as its supervisor does, once the supervisor no longer wakes it: a new
    box's supervisor pushes its first samples and sees its start's CPU as activity, and either
    wakes the store (as it should: CI saw this test's sleep undone so). A sleep that outlasts a
    whole look of the supervisor holds until something wants the store."""
    deadline = time.monotonic() + 60
    while True:
        store.sleep()
        time.sleep(background.QUIET_WINDOW + 0.5)
        if store.asleep() and _store_pids(box_id) == []:
            return
        assert time.monotonic() < deadline, "the supervisor kept waking the store of a calm box"


@pytest.mark.parametrize("sandbox", ["namespaces", "off"])
def test_a_sleeping_store_is_stopped_and_a_read_starts_it_with_its_data(sandbox, monkeypatch, make_repo, run_wtbox,
                                                                        wtbox_home):
    monkeypatch.setenv("WTBOX_SANDBOX", sandbox)
    repo = make_repo(toml=BARE_TOML)
    box = json.loads(run_wtbox("new", "sleepy", "--repo", str(repo), "--json").stdout)
    box_id, run_dir = box["id"], wtbox_home / "boxes" / box["id"] / "run"
    url = json.loads(run_wtbox("status", box_id, "--json").stdout)["metrics"]["url"]
    store = store_sleep.Store(wtbox_home, box_id, run_dir)
    try:
        _push_and_keep(url, "sleepy_mark 42\n")
        assert _store_pids(box_id)
        _sleep_once_calm(store, box_id)
        # asleep: no process, the marker, and status says it sleeps rather than that it is down
        assert _store_pids(box_id) == [] and store_sleep.asleep(run_dir)
        status = json.loads(run_wtbox("status", box_id, "--json").stdout)["metrics"]
        assert status["asleep"] is True and status["up"] is True
        # a read starts it again (through the supervisor, in the box's network) with what it held
        out = json.loads(run_wtbox("metrics", box_id, "sleepy_mark", "--json").stdout)
        assert [r["value"][1] for r in out["result"]] == ["42"]
        assert _store_pids(box_id) and not store_sleep.asleep(run_dir)
        assert json.loads(run_wtbox("status", box_id, "--json").stdout)["metrics"]["asleep"] is False

        # its supervisor killed, and its store asleep (stopped after the kill: the read just now keeps
        # a live supervisor waking it for READ_LINGER)
        supervisor = int((run_dir / "supervisor.pid").read_text().split()[0])
        os.kill(supervisor, signal.SIGKILL)
        assert wait_for(lambda: not procs.pid_alive(supervisor), timeout=5)
        store.sleep()
        read = run_wtbox("metrics", box_id, "sleepy_mark", check=False)
        if sandbox == "namespaces":  # only the supervisor runs in the box's network: one sentence
            assert read.returncode != 0 and "Traceback" not in read.stderr
            assert f"'wtbox up {box_id}'" in read.stderr and len(read.stderr.strip().splitlines()) == 1
            run_wtbox("up", box_id)
            read = run_wtbox("metrics", box_id, "sleepy_mark")
        assert read.returncode == 0 and "42" in read.stdout  # unsandboxed, wtbox starts it on the host
        assert _store_pids(box_id)
    finally:
        run_wtbox("rm", "--force", box_id)
    assert _store_pids(box_id) == [] and not run_dir.exists()


def test_rm_of_a_box_whose_store_sleeps_leaves_nothing(make_repo, run_wtbox, wtbox_home):
    repo = make_repo(toml=BARE_TOML)
    box = json.loads(run_wtbox("new", "sleeprm", "--repo", str(repo), "--json").stdout)
    run_dir = wtbox_home / "boxes" / box["id"] / "run"
    _sleep_once_calm(store_sleep.Store(wtbox_home, box["id"], run_dir), box["id"])
    assert _store_pids(box["id"]) == []
    run_wtbox("rm", box["id"])
    assert _store_pids(box["id"]) == [] and not run_dir.parent.exists()
    gc = json.loads(run_wtbox("gc", "--dry-run", "--json").stdout)
    assert box["id"] not in json.dumps(gc)


def test_the_store_sleeps_and_wakes_without_psutil(tmp_path):
    """What the supervisor runs: psutil, loaded, would cost each idle supervisor 1.8 MB (scripts/bench_scale.py)."""
    script = f"""
import socket, sys, urllib.request
from pathlib import Path
from worktreebox.providers.metrics import native as vm
from worktreebox.telemetry import store_sleep
from worktreebox.telemetry.vmclient import Client
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
base = Path({str(tmp_path)!r})
box_id, run = "unit-5eeb0000", base / "boxes" / "unit-5eeb0000" / "run"
vm.start(box_id, port=port, data_dir=run.parent / "metrics", run_dir=run)
url = f"http://127.0.0.1:{{port}}"
urllib.request.urlopen(urllib.request.Request(url + "/api/v1/import/prometheus", data=b"kept 7\\n"), timeout=5)
Client(url).flush()
for name in [m for m in sys.modules if m == "psutil" or m.startswith("psutil.")]:
    del sys.modules[name]  # what vm.start's helpers loaded: the supervisor never ran those
store = store_sleep.Store(base, box_id, run)
store.sleep()
assert store.asleep() and not (run / vm.PID_FILE).exists()
store.wake()
assert not store.asleep()
first = (run / vm.PID_FILE).read_text()
(run / store_sleep.ASLEEP).touch()  # a waker killed between the start and the marker's removal
store.wake()  # takes the running store as it is: no second one (which could not bind its port)
assert not store.asleep() and (run / vm.PID_FILE).read_text() == first
assert "psutil" not in sys.modules, "psutil loaded"
got = Client(url).query("kept")["result"]
assert [r["value"][1] for r in got] == ["7"], got
store.sleep()
print("ok")
"""
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
        assert vm.find_processes("unit-5eeb0000", box_dir=tmp_path / "boxes" / "unit-5eeb0000") == []
    finally:  # a failed script leaves its store running
        vm.stop("unit-5eeb0000", run_dir=tmp_path / "boxes" / "unit-5eeb0000" / "run")
