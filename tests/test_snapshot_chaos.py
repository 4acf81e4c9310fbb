"""Crash safety of snapshot, restore and fork: kill -9 `wtbox snapshot|restore|fork` at random
moments, then `wtbox gc --grace 0` must leave only whole boxes and finished snapshots: no scratch
dir, no database copy no snapshot names, no frozen box, no half-made fork, and never a box that is
reported ready while half-restored (a killed restore leaves it `restoring`; running it again
finishes it). Same machinery and checks as tests/test_chaos.py, with a database-mode box."""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import chaos_rng
from test_chaos import HAVE_PG, HAVE_REDIS, SERVICE, Chaos, _answers, outside  # noqa: F401 (a fixture, used by name)

from worktreebox.system import cgroups

pytestmark = [pytest.mark.chaos, pytest.mark.skipif(not HAVE_PG, reason="needs PostgreSQL")]

ITERATIONS = int(os.environ.get("WTBOX_CHAOS_ITERATIONS", "12"))
TOML = ('[box]\nports = ["web"]\n[database]\nmode = "database"\n'
        "migrate = \"psql -q -c 'CREATE TABLE items (id serial PRIMARY KEY, note text)'\"\n"
        "[observability]\nenabled = false\n"
        f'[services.web]\ncmd = "{sys.executable} server.py"\nready = "tcp:{{{{ ports.web }}}}"\n'
        + ('[backing.redis]\nimage = "redis:7"\n' if HAVE_REDIS else ""))  # every resource, as test_chaos


def _snapshot_copies(home: Path) -> set[str]:
    out = set()
    for meta in (home / "boxes").glob("*/snapshots/*/meta.json"):
        copy = (json.loads(meta.read_text()).get("database") or {}).get("copy")
        if copy:
            out.add(copy)
    return out


def _timed(chaos: Chaos, *args: str) -> float:
    t0 = time.monotonic()
    chaos.wtbox(*args)
    return time.monotonic() - t0


def _check(chaos: Chaos, source: str) -> None:
    """After gc: the source box is whole (or restoring, and a restore finishes it), nothing stray is left."""
    live = {b["id"]: b for b in chaos.live()}
    if live[source]["state"] == "restoring":
        assert "restore" in live[source]["reason"]
        chaos.wtbox("restore", source, "base")
        live = {b["id"]: b for b in chaos.live()}
    chaos.check_alive_boxes()
    assert _answers(live[source]["ports"]["web"])
    left = chaos.leftovers(set(live))
    left["pg_objects"] = {n for n in left.get("pg_objects", set())
                          if n not in _snapshot_copies(chaos.home) and not n.startswith("wt_golden_")
                          and n[:11] not in
                          {f"wt_{i.rsplit('-', 1)[-1]}" for i in live}}
    left["scratch"] = {str(p) for p in chaos.home.glob("boxes/*/snapshots/.tmp-*")}
    backend = cgroups.for_home(chaos.home)
    left["frozen"] = {i for i in live if backend is not None and backend.exists(i) and backend.frozen(i)}
    assert not any(left.values()), {k: v for k, v in left.items() if v}


def _remove_forks(chaos: Chaos, source: str) -> None:
    """Forks that finished before the kill are whole boxes: removed, to keep the host small."""
    for b in chaos.live():
        if b["id"] != source:
            chaos.wtbox("rm", "--force", b["id"])


def _remove_all(chaos: Chaos) -> dict[str, set]:
    """Every box removed, gc run, the cluster stopped; what is left (the golden copies may stay)."""
    chaos.wtbox("rm", "--all", "--yes", "--force", check=False)
    chaos.wtbox("gc", "--grace", "0", check=False)
    final = chaos.leftovers(set())
    chaos.wtbox("db", "stop", check=False)
    final["pg_objects"] = {n for n in final.get("pg_objects", set()) if not n.startswith("wt_golden_")}
    return final


def test_kill_dash_nine_during_snapshot_restore_fork_then_gc(tmp_path, make_repo, outside):  # noqa: F811
    repo = make_repo({"server.py": SERVICE}, toml=TOML)
    chaos = Chaos(outside / "home", repo, tmp_path)  # the cluster's home outside pytest's basetemp (see outside)
    rng = chaos_rng()
    chaos.wtbox("db", "start")
    try:
        source = json.loads(chaos.wtbox("new", "source", "--repo", str(repo), "--json").stdout)["id"]
        chaos.wtbox("snapshot", source, "base")
        usual = {"snapshot": _timed(chaos, "snapshot", source, "calib"),
                 "restore": _timed(chaos, "restore", source, "base"),
                 "fork": _timed(chaos, "fork", source, "-n", "2", "--task", "calib")}
        for b in chaos.live():
            if b["task"].startswith("calib"):
                chaos.wtbox("rm", "--force", b["id"])
        phases: collections.Counter = collections.Counter()
        for i in range(ITERATIONS):
            op = rng.choice(sorted(usual))
            args = {"snapshot": ("snapshot", source, f"s{i}"), "restore": ("restore", source, "base"),
                    "fork": ("fork", source, "-n", "2", "--task", f"f{i}")}[op]
            p, phase_file = chaos.spawn(*args)
            time.sleep(rng.uniform(0, usual[op]))
            p.send_signal(signal.SIGKILL)
            p.wait()
            text = phase_file.read_text() if phase_file.exists() else ""
            phases[f"{op}@{text.split()[-1] if text else 'start'}"] += 1
            chaos.wtbox("gc", "--grace", "0")
            _check(chaos, source)
            _remove_forks(chaos, source)
        print(f"\nsnapshot chaos: {ITERATIONS} kills; by phase: {dict(sorted(phases.items()))}")
    finally:
        final = _remove_all(chaos)
    assert not any(final.values()), final


STOPS = ["snapshot:op", "snapshot:frozen", "snapshot:files", "snapshot:meta", "restore:copied", "restore:marked",
         "restore:files", "restore:swapped", "fork:snapshot", "new:create"]


def test_kill_at_every_phase_then_gc(tmp_path, make_repo, outside):  # noqa: F811
    """Halted at each phase (WTBOX_PHASE_STOP) and killed there: the frozen box is thawed, the half-restored
    one is `restoring` until restored again, the half-made fork and the copies are gone."""
    from helpers import wait_for

    repo = make_repo({"server.py": SERVICE}, toml=TOML)
    chaos = Chaos(outside / "home", repo, tmp_path)
    chaos.wtbox("db", "start")
    try:
        source = json.loads(chaos.wtbox("new", "source", "--repo", str(repo), "--json").stdout)["id"]
        chaos.wtbox("snapshot", source, "base")
        for i, stop in enumerate(STOPS):
            op = stop.split(":")[0]
            (Path(chaos.live()[0]["path"]) / "changed.txt").write_text(f"{i}\n")  # restore must put files back
            args = {"snapshot": ("snapshot", source, f"s{i}"), "restore": ("restore", source, "base"),
                    "fork": ("fork", source, "-n", "2", "--task", f"f{i}"),
                    "new": ("fork", source, "--task", f"f{i}")}[op]
            phase_file, err = tmp_path / f"phase-{i}", tmp_path / f"stderr-{i}"
            p = subprocess.Popen([sys.executable, "-m", "worktreebox.cli.main", *args], stdout=subprocess.DEVNULL,
                                 stderr=err.open("w"), env={**chaos.env, "WTBOX_PHASE_STOP": stop,
                                                            "WTBOX_PHASE_FILE": str(phase_file)})
            reached = wait_for(lambda p=p, f=phase_file, stop=stop: p.poll() is not None
                               or (f.exists() and stop in f.read_text()), timeout=60)
            assert reached and p.poll() is None, (stop, err.read_text())
            p.send_signal(signal.SIGKILL)
            p.wait()
            chaos.wtbox("gc", "--grace", "0")
            _check(chaos, source)
            _remove_forks(chaos, source)
    finally:
        final = _remove_all(chaos)
    assert not any(final.values()), final
