"""Cancelling a creation that runs in a thread (MCP's box_new) as Ctrl-C cancels a command:
system/cancel.py's waits end at once, their children stopped, and Host.new rolls back."""
from __future__ import annotations

import os
import threading
import time

import pytest
from helpers import SLOW_SETUP_TOML, git, wait_for

from worktreebox.errors import Interrupted
from worktreebox.operations import boxes
from worktreebox.system import cancel, procs

NEVER_READY_TOML = """
[database]
mode = "none"
[observability]
enabled = false
[services.web]
cmd = "sleep 600"
ready = "http://127.0.0.1:{{ ports.web }}/"
ready_timeout = "300s"
"""


def set_after(event: threading.Event, seconds: float) -> None:
    threading.Timer(seconds, event.set).start()


def test_run_and_wait_are_plain_calls_without_a_watched_event():
    assert cancel.run(["sh", "-c", "echo hi"], capture_output=True, text=True).stdout == "hi\n"
    proc = procs.spawn(["true"])
    assert cancel.wait(proc) == 0
    cancel.check()  # nothing watched: never cancelled


def test_a_cancelled_run_kills_its_child_at_once():
    event = threading.Event()
    set_after(event, 0.3)
    t0 = time.monotonic()
    with cancel.watching(event), pytest.raises(cancel.Cancelled):
        cancel.run(["sleep", "30"], capture_output=True, text=True)
    assert time.monotonic() - t0 < 2


@pytest.mark.slow
def test_a_cancelled_wait_stops_the_childs_whole_group():
    event = threading.Event()
    proc = procs.spawn(["sh", "-c", "sleep 30 & sleep 30; wait"])
    set_after(event, 0.3)
    with cancel.watching(event), pytest.raises(cancel.Cancelled):
        cancel.wait(proc)
    assert procs.wait_gone([proc.pid], timeout=5) == []

    def group_gone() -> bool:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return True
        return False

    assert wait_for(group_gone, timeout=5)  # nothing of its group is left (the orphan reaped too)


def test_a_thread_started_in_a_copy_of_the_context_sees_the_event():
    import contextvars

    event, seen = threading.Event(), []
    with cancel.watching(event):
        ctx = contextvars.copy_context()
    event.set()
    t = threading.Thread(target=ctx.run, args=(lambda: seen.append(cancel.cancelled()),))
    t.start()
    t.join()
    assert seen == [True] and not cancel.cancelled()


@pytest.mark.slow
def test_a_creation_cancelled_while_waiting_for_a_service_rolls_back(host, make_repo):
    repo = make_repo(toml=NEVER_READY_TOML)
    event, outcome, notes = threading.Event(), [], []

    def progress(message: str) -> None:
        notes.append(message)
        if message.startswith("starting services"):
            set_after(event, 0.5)  # well inside the wait for readiness

    def create() -> None:
        with cancel.watching(event):
            try:
                boxes.new(host, "cancelled", repo=str(repo), progress=progress)
            except BaseException as e:
                outcome.append(e)

    t0 = time.monotonic()
    worker = threading.Thread(target=create)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive()
    assert [type(e) for e in outcome] == [Interrupted], (outcome, notes)
    assert time.monotonic() - t0 < 60  # not the 300 s the readiness wait allows
    assert host.list() == []
    assert not (host.boxes_dir.exists() and any(host.boxes_dir.iterdir()))
    assert git(repo, "branch", "--list", "wtbox/*").strip() == ""
    assert procs.discover_box_ids(host.boxes_dir) == set()


def test_the_roll_back_of_a_cancelled_creation_is_not_cancelled_itself(host, make_repo, monkeypatch):
    """The event stays set while the half-made box is removed: a clean-up step that waits on a child
    (git, under load longer than one poll) was cancelled too, and left the box's row, lease and dir
    (an MCP test failed so under load). A poll shorter than any child makes that happen every time."""
    repo = make_repo(toml=SLOW_SETUP_TOML)
    event = threading.Event()
    monkeypatch.setattr(cancel, "POLL", 0.0001)

    def progress(message: str) -> None:
        if "setup" in message:
            event.set()

    with cancel.watching(event), pytest.raises(Interrupted):
        boxes.new(host, "cancelled", repo=str(repo), progress=progress)
    assert host.list() == []
    assert not (host.boxes_dir.exists() and any(host.boxes_dir.iterdir()))
    assert not {o for o in host.registry.lease_owners() if not o.startswith("@")}  # "@...": the home's own
    assert procs.discover_box_ids(host.boxes_dir) == set()
