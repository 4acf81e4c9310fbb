"""Spare sandboxes (providers/sandbox/spares.py, resources/sandbox_spares.py): a holder made ahead
after a sandboxed `new`, taken by the next `new` of the same recipe, ended by itself, by gc and by a
kill -9 of whoever held it, never leaving a process, a dir or a cgroup behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import CORE_TOML, Running, wait_for
from sandbox_helpers import needs_sandbox_tools

from worktreebox.box import hex_of
from worktreebox.providers.sandbox import spares
from worktreebox.providers.sandbox.base import load
from worktreebox.services import client, zygote
from worktreebox.system import cgroups, procfs, procs

pytestmark = [needs_sandbox_tools(), pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="spares are made where boxes are sandboxed as root")]

TOML = CORE_TOML + '\n[box]\nports = ["web"]\n'


@pytest.fixture
def with_spares(monkeypatch, wtbox_home):
    monkeypatch.setenv("WTBOX_SANDBOX_SPARES", "1")
    monkeypatch.setenv("WTBOX_SANDBOX", "namespaces")
    yield wtbox_home
    _drop_all(wtbox_home)


def _drop_all(home: Path) -> None:
    """What a test left: its boxes and every spare (as `rm --all` and `gc --spares` do)."""
    subprocess.run([sys.executable, "-m", "worktreebox.cli.main", "rm", "--all", "--force", "--yes"],
                   env={**os.environ, "WTBOX_HOME": str(home)}, capture_output=True)
    subprocess.run([sys.executable, "-m", "worktreebox.cli.main", "gc", "--spares", "--grace", "0"],
                   env={**os.environ, "WTBOX_HOME": str(home)}, capture_output=True)


def _ready_spares(home: Path) -> list[Path]:
    found = []
    for d in (home / "boxes").glob(f"{spares.PREFIX}*"):
        try:
            if json.loads((d / "run" / spares.RECORD).read_text()).get("ready"):
                found.append(d)
        except (OSError, ValueError):
            continue
    return found


def _wait_spare(home: Path) -> Path:
    assert wait_for(lambda: _ready_spares(home), timeout=60, every=0.1), \
        f"no spare was made: {[p.read_text() for p in (home / spares.SPARES_DIR).glob('*.log')]}"
    return _ready_spares(home)[0]


def _running_as(box_id: str) -> list[int]:
    """Live processes whose WTBOX_ID is `box_id` or whose command line names its dir."""
    out = []
    for pid in procfs.pids():
        env = procfs.environ(pid) or b""
        if f"WTBOX_ID={box_id}\0".encode() in env or any(box_id in a for a in procfs.cmdline(pid)):
            out.append(pid)
    return out


def _all_of(home: Path, box_id: str) -> set[int]:
    """Its processes by name, and by its cgroup (the launcher forked ahead carries the zygote's names)."""
    backend = cgroups.for_home(home)
    return set(_running_as(box_id)) | (backend.pids(box_id) if backend is not None else set())


def _cgroup_left(home: Path, box_id: str) -> bool:
    backend = cgroups.for_home(home)
    return backend is not None and hex_of(box_id) in set(backend.box_keys())


def _gc_plan(run_wtbox) -> list[dict]:
    return json.loads(run_wtbox("gc", "--dry-run", "--json").stdout)["actions"]


def test_the_next_new_takes_the_spare_made_after_the_last(make_repo, host, with_spares, run_wtbox):
    z = Running(with_spares)
    try:
        repo = make_repo(toml=TOML)
        a = host.new("a", repo=repo)
        spare = _wait_spare(with_spares)
        holder = load(spare / "run")
        assert holder is not None and procs.is_alive(holder.identity)
        assert (spare / "run" / zygote.LAUNCHER).exists()  # its supervisor's launcher, forked ahead
        assert (spare / "git" / "worktrees" / "worktree" / "HEAD").read_text() == ""  # its git dir made ahead, empty
        backend = cgroups.for_home(with_spares)
        if backend is not None:  # all of it in the spare's cgroup, which is the box's that takes it
            assert holder.pid in backend.pids(spare.name, "_sandbox")
            assert len(backend.pids(spare.name, cgroups.SUPERVISOR)) == 1  # the launcher
        assert _gc_plan(run_wtbox) == []  # a live spare is nobody's orphan

        b = host.new("b", repo=repo)
        assert hex_of(b.id) == hex_of(spare.name) and b.alias == spare.name
        assert not spare.exists() and b.dir.is_dir()
        assert load(b.run_dir).pid == holder.pid  # the spare's holder is the box's
        sup = client.supervisor_pid(b)
        assert sup is not None and "worktreebox.services.zygote" in " ".join(procfs.cmdline(sup))
        if backend is not None:
            assert backend.pids(b.id, cgroups.SUPERVISOR) == {sup}  # the launcher forked ahead became it
            assert holder.pid in backend.pids(b.id, "_sandbox")
        state = client.read_state(b)
        assert state is not None and "web" in state.forwards

        inside = run_wtbox("exec", b.id, "--", "sh", "-c",
                           f"hostname; git status --short | wc -l; test -f README.md && echo files; "
                           f"ls {b.dir.parent}").stdout.split()
        assert inside[:3] == [b.id, "0", "files"]
        assert a.id not in inside[3:] and set(inside[3:]) <= {b.id, spare.name}  # nothing of box a
        assert not (b.run_dir / zygote.LAUNCHER).exists()

        # the next spare is made after b too, and b outlives the spare it was (its holder sleeps on)
        assert wait_for(lambda: _ready_spares(with_spares), timeout=60)
        host.rm(b.id, force=True)
        for name in (b.id, spare.name):
            assert _running_as(name) == [], name
            assert not _cgroup_left(with_spares, name)
        assert not b.dir.exists()
        assert _gc_plan(run_wtbox) == []
    finally:
        z.end()


def test_gc_keeps_a_live_spare_and_removes_an_ended_one_or_all_with_spares(make_repo, host, with_spares, run_wtbox):
    repo = make_repo(toml=CORE_TOML)
    box = host.new("a", repo=repo)
    first = _wait_spare(with_spares)
    host.rm(box.id, force=True)
    assert _gc_plan(run_wtbox) == []

    os.kill(load(first / "run").pid, signal.SIGKILL)  # its holder ends (as at its ttl, or a kill)
    assert wait_for(lambda: spares.kept(with_spares) == set(), timeout=10)
    plan = _gc_plan(run_wtbox)
    assert [a["id"] for a in plan] == [first.name] and "nobody took" in plan[0]["reason"]
    run_wtbox("gc")
    assert not first.exists() and _running_as(first.name) == [] and not _cgroup_left(with_spares, first.name)

    box = host.new("b", repo=repo)
    second = _wait_spare(with_spares)
    host.rm(box.id, force=True)
    out = run_wtbox("gc", "--spares", "--json").stdout
    assert [a["id"] for a in json.loads(out)["actions"]] == [second.name]
    assert not second.exists() and _running_as(second.name) == []
    assert not _cgroup_left(with_spares, second.name)
    assert not os.path.ismount(with_spares / "boxes")  # no box and no spare: boxes/ is no mount any more


def test_a_spare_nobody_takes_ends_itself_and_a_taken_one_lives_on(make_repo, host, with_spares, monkeypatch,
                                                                     run_wtbox):
    monkeypatch.setenv("WTBOX_SANDBOX_SPARE_TTL", "6")
    z = Running(with_spares)
    try:
        repo = make_repo(toml=CORE_TOML)
        a = host.new("a", repo=repo)
        spare = _wait_spare(with_spares)
        b = host.new("b", repo=repo)  # takes it
        assert b.alias == spare.name
        third = _wait_spare(with_spares)
        pids = _all_of(with_spares, third.name)
        assert len(pids) >= 5, pids  # bwrap, its shell and sleep, slirp4netns, the launcher forked ahead
        # past the ttl: the untaken spare is gone, whole (holder, slirp4netns, the launcher forked ahead)
        assert wait_for(lambda: not any(procs.pid_alive(p) for p in pids), timeout=30), \
            [procfs.cmdline(p) for p in pids if procs.pid_alive(p)]
        assert [x["id"] for x in _gc_plan(run_wtbox)] == [third.name]
        run_wtbox("gc")
        assert not third.exists() and not _cgroup_left(with_spares, third.name)
        # the taken one sleeps on past its ttl: b works
        assert run_wtbox("exec", b.id, "--", "hostname").stdout.strip() == b.id
        assert load(b.run_dir) is not None and procs.is_alive(load(b.run_dir).identity)
        host.rm(a.id, force=True)
        host.rm(b.id, force=True)
    finally:
        z.end()


@pytest.mark.parametrize("phase", ["new:row", "new:create:worktree"])
def test_kill_dash_nine_of_new_that_took_a_spare_leaves_what_gc_removes(make_repo, host, with_spares, run_wtbox,
                                                                         phase):
    repo = make_repo(toml=CORE_TOML)
    host.rm(host.new("a", repo=repo).id, force=True)
    spare = _wait_spare(with_spares)
    env = {**os.environ, "WTBOX_HOME": str(with_spares), "WTBOX_NO_AUTO_GC": "1", "WTBOX_PHASE_STOP": phase}
    proc = subprocess.Popen([sys.executable, "-m", "worktreebox.cli.main", "new", "b", "--repo", str(repo)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # halted at the phase: the spare is taken (its record renamed), before or after its dir moved
        assert wait_for(lambda: not (spare / "run" / spares.RECORD).exists(), timeout=60)
        time.sleep(0.5)
    finally:
        proc.kill()
        proc.wait()
    run_wtbox("gc", "--grace", "0")
    assert _all_of(with_spares, spare.name) == set()
    assert not _cgroup_left(with_spares, spare.name)
    assert [p.name for p in (with_spares / "boxes").iterdir()] == []
    assert _gc_plan(run_wtbox) == []


def test_a_box_named_spare_is_a_box_like_any_other(make_repo, host, with_spares, run_wtbox):
    repo = make_repo(toml=CORE_TOML)
    box = host.new("spare", repo=repo)
    assert box.id.startswith(spares.PREFIX) and box.alias is None
    _wait_spare(with_spares)
    assert _gc_plan(run_wtbox) == []
    run_wtbox("gc", "--spares")
    assert host.get(box.id).dir.is_dir()
    assert run_wtbox("exec", box.id, "--", "hostname").stdout.strip() == box.id


def test_which_spares_gc_keeps(tmp_path):
    """kept(): being made by a live maker, ready with a live holder, or taken by a live taker."""
    home = tmp_path / "home"
    me = procs.identity(os.getpid())
    dead = [2**22 + 1, 1]  # no such process

    def spare(name: str, record: dict | None = None, taken_by: list[int] | None = None) -> None:
        run = home / "boxes" / f"{spares.PREFIX}{name}" / "run"
        run.mkdir(parents=True)
        if record is not None:
            (run / spares.RECORD).write_text(json.dumps(record))
        if taken_by is not None:
            (run / f"{spares.TAKEN}{taken_by[0]}-{taken_by[1]}.json").write_text("{}")

    spare("0000000a", {"key": "k", "maker": me, "ready": False})
    spare("0000000b", {"key": "k", "maker": dead, "ready": False})
    spare("0000000c", {"key": "k", "maker": dead, "ready": True})  # no holder record: its holder is gone
    spare("0000000d", taken_by=me)
    spare("0000000e", taken_by=dead)
    spare("0000000f")  # neither: a maker killed before its record
    assert spares.kept(home) == {"spare-0000000a", "spare-0000000d"}
    assert spares.kept(home, taken_only=True) == {"spare-0000000d"}
    assert spares.count(home, "k") == 1


def test_a_spare_whose_holder_ended_as_it_was_taken_gives_way_to_a_holder_of_its_own(make_repo, host, with_spares,
                                                                                      monkeypatch, run_wtbox):
    from worktreebox.resources import sandbox_spares

    repo = make_repo(toml=CORE_TOML)
    host.rm(host.new("a", repo=repo).id, force=True)
    spare = _wait_spare(with_spares)
    ended = load(spare / "run")
    moved_in = sandbox_spares.move_in

    def move_in_as_it_ends(h, box) -> None:  # as a `gc --spares` at that moment would leave it
        moved_in(h, box)
        os.kill(ended.pid, signal.SIGKILL)
        assert wait_for(lambda: not procs.is_alive(ended.identity), timeout=10)

    monkeypatch.setattr(sandbox_spares, "move_in", move_in_as_it_ends)
    b = host.new("b", repo=repo)
    assert hex_of(b.id) == hex_of(spare.name) and b.alias is None
    holder = load(b.run_dir)
    assert holder is not None and holder.pid != ended.pid and procs.is_alive(holder.identity)
    assert run_wtbox("exec", b.id, "--", "hostname").stdout.strip() == b.id
    host.rm(b.id, force=True)
    assert _all_of(with_spares, b.id) == set() and _all_of(with_spares, spare.name) == set()


def test_a_spares_maker_waits_before_it_makes_one_and_gc_spares_ends_it(make_repo, host, with_spares, monkeypatch,
                                                                       run_wtbox):
    """The next spare is made once WTBOX_SANDBOX_SPARE_DELAY has passed (what follows the `new` that
    asked runs first: an `exec` right after it measured ~8 ms slower beside a maker); `gc --spares`
    ends a maker that waits, and nothing is made after it."""
    monkeypatch.setenv("WTBOX_SANDBOX_SPARE_DELAY", "60")
    b = host.new("a", repo=make_repo(toml=CORE_TOML))
    makers = lambda: [json.loads(f.read_text()) for f in (with_spares / spares.SPARES_DIR).glob("*.maker")]
    assert wait_for(lambda: makers() and procs.is_alive(makers()[0]), timeout=30)
    maker = makers()[0]
    time.sleep(1.0)  # (a maker that did not wait makes one in ~0.2 s)
    assert procs.is_alive(maker) and not list((with_spares / "boxes").glob(f"{spares.PREFIX}*"))
    run_wtbox("gc", "--spares")
    assert not procs.is_alive(maker) and makers() == []
    assert host.get(b.id).state == "ready" and not list((with_spares / "boxes").glob(f"{spares.PREFIX}*"))


@pytest.mark.parametrize("changed", ["blocked", "recipe"])
def test_a_spare_made_before_the_host_changed_gives_way_to_a_holder_of_its_own(make_repo, host, with_spares,
                                                                               run_wtbox, changed):
    """`blocked`: its firewall blocks the addresses the host had then (a box made of it could reach a
    new one); `recipe`: it binds what the box's toolchains needed then (one installed since would be
    missing). Taken by its key, it is checked beside the checkout: the box makes its own holder."""
    repo = make_repo(toml=CORE_TOML)
    host.rm(host.new("a", repo=repo).id, force=True)
    spare = _wait_spare(with_spares)
    old = load(spare / "run")
    record = json.loads((spare / "run" / spares.RECORD).read_text())
    assert record["blocked"]  # (at least the link-local ranges)
    record[changed] = [*record["blocked"], "198.51.100.0/24"] if changed == "blocked" else "0" * 16
    (spare / "run" / spares.RECORD).write_text(json.dumps(record))
    b = host.new("b", repo=repo)
    assert hex_of(b.id) == hex_of(spare.name) and b.alias is None  # taken, not used
    holder = load(b.run_dir)
    assert holder is not None and holder.pid != old.pid and procs.is_alive(holder.identity)
    assert not procs.is_alive(old.identity)
    # the supervisor started in the spare before it was checked is gone: one runs, the box's own
    supervisor = client.wait_started(b)
    assert cgroups.for_home(host.home).pids(b.id, cgroups.SUPERVISOR) == {supervisor}
    assert client.read_state(b) is not None and client.control_request(b, "status").ok
    assert run_wtbox("exec", b.id, "--", "hostname").stdout.strip() == b.id
    host.rm(b.id, force=True)
    assert _all_of(with_spares, b.id) == set() and _all_of(with_spares, spare.name) == set()


def test_a_boxs_recipe_is_worked_out_once_though_taking_a_spare_renamed_it(make_repo, host, with_spares,
                                                                            monkeypatch):
    """`take` and `replenish` both ask for the recipe, and `take` gives the box the spare's id in
    between: the toolchain's walk (~4 ms of `new`) must not run twice."""
    from worktreebox.providers.sandbox import layout
    from worktreebox.resources import sandbox_spares

    repo = make_repo(toml=CORE_TOML)
    host.new("a", repo=repo)
    spare = _wait_spare(with_spares)
    walks = []
    real = layout.toolchain
    monkeypatch.setattr(layout, "toolchain", lambda *a, **k: walks.append(a) or real(*a, **k))
    monkeypatch.setattr(sandbox_spares, "_RECIPES", {})  # as in a new process
    b = host.new("b", repo=repo)
    assert b.alias == spare.name  # it took the spare, and asked for the next
    assert len(walks) == 1


def test_a_spares_firewall_blocks_the_addresses_its_record_names(make_repo, host, with_spares):
    """`fits` compares the record's addresses with the host's of now: the record must name what the
    firewall was loaded with (the maker reads them once for both)."""
    from worktreebox.providers.sandbox import network

    repo = make_repo(toml=CORE_TOML)
    host.rm(host.new("a", repo=repo).id, force=True)
    spare = _wait_spare(with_spares)
    record = json.loads((spare / "run" / spares.RECORD).read_text())
    holder = load(spare / "run")
    rules = subprocess.run(["nsenter", "-t", str(holder.pid), "-n", "nft", "list", "table", "inet", network.TABLE],
                           capture_output=True, text=True, check=True).stdout
    shown = [a.removesuffix("/32").removesuffix("/128") for a in record["blocked"]]  # (nft shows a host bare)
    assert shown and [a for a in shown if a not in rules] == []
