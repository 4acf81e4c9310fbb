"""worktreebox/system/procs/: its pure parts (the last line of a log, the shell argv, process
identity and how a process is named in a message) on written text and on this test's own process.
The stop policy against real process groups is tests/system/test_stop.py."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from worktreebox.system import procs


@pytest.mark.parametrize(("text", "kwargs", "line"), [
    ("starting\nlistening on :8000\n", {}, "listening on :8000"),
    ("one\n\n   \n", {}, "one"),  # blank lines are no last line
    ("fatal: port taken\nWARN deprecated\n", {"noise": lambda ln: ln.startswith("WARN")}, "fatal: port taken"),
    ("WARN a\nWARN b\n", {"noise": lambda ln: ln.startswith("WARN")}, "WARN b"),  # only noise: still said
    ("2026-01-01T00:00:00Z error: boom\n", {"tidy": lambda ln: ln.split(" ", 1)[1]}, "error: boom"),
    ("x" * 500 + "\n", {}, "x" * 300),
    ("", {}, "no output"),
    ("\n \n", {}, "no output"),
    (b"bad \xff byte\n", {}, "bad \ufffd byte"),
])
def test_last_line(tmp_path, text, kwargs, line):
    log = tmp_path / "app.log"
    log.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert procs.last_line(log, **kwargs) == line


def test_last_line_of_a_missing_log(tmp_path):
    assert procs.last_line(tmp_path / "never-written.log") == "no log"


@pytest.mark.parametrize("cmd", ["echo hi", "a && b; c | d", "exec 'quoted arg'", "", "$(id)"])
def test_a_wtbox_toml_command_runs_under_sh_c_unchanged(cmd):
    assert procs.shell_argv(cmd) == ["/bin/sh", "-c", cmd]


def test_identity_of_this_process_is_stable_and_alive():
    me = procs.identity(os.getpid())
    assert me is not None and me[0] == os.getpid() and me == procs.identity(os.getpid())
    assert procs.is_alive(me) and procs.pid_alive(os.getpid())


@pytest.mark.parametrize("value", [None, [], 0])
def test_no_identity_is_never_alive(value):
    assert not procs.is_alive(value) and not procs.pid_alive(value or None)


def test_a_reused_pid_is_not_the_same_process():
    me = procs.identity(os.getpid())
    assert not procs.is_alive([me[0], me[1] + 1])  # same pid, another start time


def test_an_ended_process_is_not_alive_and_a_zombie_is_not_either():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    born = procs.identity(child.pid)
    while procs.pid_alive(child.pid):  # it exits; until reaped it is a zombie, which is dead too
        time.sleep(0.005)
    assert born is None or not procs.is_alive(born)
    child.wait()
    assert procs.identity(child.pid) is None and not procs.pid_alive(child.pid)


def test_the_caller_and_its_ancestors_are_spared():
    spared = procs.caller_and_ancestors()
    assert {os.getpid(), os.getppid()} <= spared and 1 not in spared


def test_a_process_is_described_in_one_short_line():
    text = procs.describe(os.getpid())
    assert text.startswith(f"pid {os.getpid()} (") and text.endswith(")") and "\n" not in text
    assert len(text) <= len(f"pid {os.getpid()} ()") + 80
    assert procs.describe(0) == "a process of another user"


@pytest.mark.parametrize("pgid", [None, 0, 1, -5])
def test_signalling_no_group_or_init_is_refused(pgid):
    assert procs.signal_group(pgid, 0) is False
