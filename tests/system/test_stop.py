"""The one stop policy (system/procs/stop.py): SIGTERM, KILL_WAIT, SIGKILL, gone. Real processes."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
from helpers import wait_for

from worktreebox.settings import kill_wait
from worktreebox.system import procs

# A process group: a shell that ignores SIGTERM (or not) with a child that does the same.
STUBBORN = "trap '' TERM; sleep 30 & wait; wait"
OBEDIENT = "sleep 30 & wait"


@pytest.mark.parametrize("value, seconds", [(None, 5.0), ("1.5", 1.5), ("0", 0.0), ("soon", 5.0), ("-2", 5.0)])
def test_kill_wait_setting(monkeypatch, value, seconds):
    if value is None:
        monkeypatch.delenv("WTBOX_KILL_WAIT", raising=False)
    else:
        monkeypatch.setenv("WTBOX_KILL_WAIT", value)
    assert kill_wait() == seconds


def group(script: str) -> subprocess.Popen:
    proc = procs.spawn(["/bin/sh", "-c", script])
    time.sleep(0.2)  # let the shell start its child
    return proc


def all_gone(pids: list[int]) -> bool:
    """The stop waits for each group's leader; the rest of a group, sent SIGKILL, ends when the
    kernel next runs it: under load a few milliseconds later (CI failed on asserting it at once)."""
    return wait_for(lambda: not any(procs.pid_alive(p) for p in pids), timeout=5.0, every=0.005)


def members(proc: subprocess.Popen) -> list[int]:
    import psutil

    return [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]


@pytest.mark.parametrize("script, at_least, at_most", [(OBEDIENT, 0.0, 0.25), (STUBBORN, 0.3, 1.5)])
def test_stop_group_waits_kill_wait_only_for_what_ignores_sigterm(monkeypatch, script, at_least, at_most):
    monkeypatch.setenv("WTBOX_KILL_WAIT", "0.3")
    proc = group(script)
    pids = members(proc)
    assert len(pids) == 2
    t0 = time.monotonic()
    procs.stop_group(proc)
    took = time.monotonic() - t0
    assert at_least <= took < at_most
    assert all_gone(pids)


@pytest.mark.slow
def test_stop_groups_costs_one_wait_for_many(monkeypatch):
    monkeypatch.setenv("WTBOX_KILL_WAIT", "0.4")
    groups = [group(STUBBORN) for _ in range(3)]
    pids = [p for g in groups for p in members(g)]
    t0 = time.monotonic()
    procs.stop_groups(groups)
    assert time.monotonic() - t0 < 1.2  # one 0.4 s wait, not three
    assert all_gone(pids)


@pytest.mark.slow
def test_stop_pid_and_stop_processes(monkeypatch):
    import psutil

    monkeypatch.setenv("WTBOX_KILL_WAIT", "0.3")
    ignore_term = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(flush=True); time.sleep(9)"
    stubborn = subprocess.Popen([sys.executable, "-c", ignore_term], stdout=subprocess.PIPE)
    stubborn.stdout.readline()  # it ignores SIGTERM from here on
    t0 = time.monotonic()
    assert procs.stop_pid(stubborn.pid) and not procs.pid_alive(stubborn.pid)
    assert time.monotonic() - t0 >= 0.3  # it took SIGKILL, after the wait
    assert procs.stop_pid(stubborn.pid)  # gone already: fine
    proc = group(STUBBORN)
    pids = members(proc)
    assert procs.stop_processes([psutil.Process(proc.pid)]) == [proc.pid]
    assert all_gone(pids)  # its whole group went with it


def test_an_explicit_wait_overrides_the_setting(monkeypatch):
    monkeypatch.setenv("WTBOX_KILL_WAIT", "30")
    proc = group(STUBBORN)
    t0 = time.monotonic()
    procs.stop_group(proc, wait=0.2)
    assert time.monotonic() - t0 < 2 and not procs.pid_alive(proc.pid)
