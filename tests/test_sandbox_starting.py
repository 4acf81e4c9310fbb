"""A sandboxed box with nothing for its supervisor to start: `new` does not wait for the supervisor (its
forwards, its endpoint), and whatever needs it afterwards waits for one still starting.

In process there is no zygote: the supervisor is a fresh Python (~70 ms of imports) that a sandboxed
`new` waited for, twice (for its launcher, then in Sandbox.settle); a `new` in process took ~1.5x an
unsandboxed one (scripts/bench_box_sandbox.py). Here its launcher is held back a second, so the box
is certainly made before its supervisor is up.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time

import pytest
from sandbox_helpers import needs_sandbox_tools

from worktreebox.operations import boxes as box_ops
from worktreebox.services import client, control
from worktreebox.system import cgroups, procfs

pytestmark = [needs_sandbox_tools(), pytest.mark.skipif(os.geteuid() != 0, reason="the root-mode sandbox")]

TOML = '[database]\nmode = "none"\n[observability]\nenabled = false\n'
HELD = 1.0


@pytest.fixture
def held_back(monkeypatch):
    """Each supervisor's launcher starts HELD seconds late; the argv of those started."""
    real, started = client.procs.spawn, []

    def spawn(argv, **kw):
        if "worktreebox.services.supervisor" in argv:
            started.append(list(argv))
            argv = ["sh", "-c", f'sleep {HELD}; exec "$0" "$@"', *argv]
        return real(argv, **kw)

    monkeypatch.setattr(client.procs, "spawn", spawn)
    return started


def _of_box(home, box_id: str) -> list[int]:
    backend = cgroups.for_home(home)
    named = [p for p in procfs.pids() if f"WTBOX_ID={box_id}\0".encode() in (procfs.environ(p) or b"")]
    return sorted(set(named) | (backend.pids(box_id) if backend is not None else set()))


def test_new_ends_before_its_supervisor_is_up_and_what_needs_it_waits_for_it(host, make_repo, held_back):
    box = host.new("early", repo=make_repo(toml=TOML))
    assert held_back, "the supervisor was not started as a Python of its own"
    assert not (box.run_dir / control.STATE_FILE).exists()  # made; its supervisor not up yet
    assert client.supervisor_pid(box) is not None  # waited for, not taken for missing
    state = client.read_state(box)
    assert state is not None and "web" in state.forwards
    reread = host.get(box.id)  # as another command finds it in the registry
    assert client.supervisor_pid(reread) == client.supervisor_pid(box)
    host.rm(box.id, force=True)
    assert _of_box(host.home, box.id) == []


def test_rm_while_its_supervisor_starts_leaves_nothing(host, make_repo, held_back):
    box = host.new("gone", repo=make_repo(toml=TOML))
    assert not (box.run_dir / control.STATE_FILE).exists()
    host.rm(box.id, force=True)
    time.sleep(HELD + 0.5)  # past when the held-back launcher would have started it
    assert _of_box(host.home, box.id) == []
    assert not box.dir.exists()


def test_wtbox_typed_in_a_box_whose_supervisor_still_starts_waits_for_it(host, make_repo, held_back):
    box = host.new("inside", repo=make_repo(toml=TOML))
    assert not (box.run_dir / control.STATE_FILE).exists()
    wtbox = f"{shlex.quote(sys.executable)} -m worktreebox.cli.launcher"
    out = box_ops.run(host, box.id, f"{wtbox} status --json", timeout=30, tail=5000)
    assert out["exit_code"] == 0, out
    assert json.loads(out["stdout"])["id"] == box.id


def test_a_pooled_box_is_made_with_its_supervisor_up(host, make_repo, held_back):
    """Made ahead to be claimed warm: a claim must not find its supervisor still starting."""
    box = host.new("__pool__", repo=make_repo(toml=TOML), pool="k1")
    assert (box.run_dir / control.STATE_FILE).exists()
    assert client.supervisor_pid(box, wait=False) is not None
