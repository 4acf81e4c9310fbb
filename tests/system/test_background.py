"""A box that keeps the CPU busy runs as a background box (worktreebox/system/background.py), on real
processes and a real box cgroup."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import BURNER, wait_for

from worktreebox.services.client import background_wanted
from worktreebox.system import background, cgroups

# busy or calm is decided from CPU shares over time: other tests' load would change them
pytestmark = pytest.mark.serial

SPIN = "while True: pass\n"
SLEEPY = "import time\nwhile True: time.sleep(0.01)\n"


def _start(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code])


def _looks(watch: background.BusyWatch, n: int) -> None:
    for _ in range(n):
        watch.look()
        time.sleep(background.WINDOW)


def test_busy_processes_make_a_box_background_and_calm_ones_do_not():
    spinner, sleeper = _start(SPIN), _start(SLEEPY)
    switched: list[bool] = []
    try:
        quiet = background.BusyWatch(lambda: [sleeper.pid], lambda on: switched.append(on) or True, cpus=1)
        _looks(quiet, 4)
        assert not quiet.background and switched == []
        # on a one-CPU host one spinner fills every CPU
        busy = background.BusyWatch(lambda: [spinner.pid, sleeper.pid], lambda on: switched.append(on) or True,
                                    cpus=1)
        _looks(busy, 1 + background.LOOKS)  # a first look to compare with, then LOOKS busy ones
        busy.look()
        assert busy.background and switched == [True]
        spinner.kill()
        spinner.wait()
        _looks(busy, background.LOOKS + 1)
        assert not busy.background and switched == [True, False]
    finally:
        for p in (spinner, sleeper):
            p.kill()
            p.wait()


def test_a_busy_box_that_gets_little_cpu_stays_background():
    """Runnable time, not CPU time: three spinners squeezed onto one CPU of a crowded host still
    want it, so the box does not flap back to normal while it is held back."""
    code = "import os\nos.sched_setaffinity(0, {0})\n" + SPIN
    spinners = [_start(code) for _ in range(3)]
    try:
        watch = background.BusyWatch(lambda: [p.pid for p in spinners[:1]], lambda on: True, cpus=1)
        _looks(watch, 2 + background.LOOKS)
        assert watch.background  # one of three spinners on one CPU: a third of the CPU, always runnable
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def test_a_box_that_wants_less_than_every_cpu_stays_a_normal_box():
    """One spinner on a two-CPU host: busy, but it leaves a CPU to the others, and background boxes
    do not share fairly among themselves (background.py), so it keeps its normal weight."""
    spinner = _start(SPIN)
    try:
        watch = background.BusyWatch(lambda: [spinner.pid], lambda on: True, cpus=2)
        _looks(watch, 2 + background.LOOKS)
        assert not watch.background
    finally:
        spinner.kill()
        spinner.wait()


@pytest.mark.parametrize("on", [True, False])
def test_a_box_burning_cpu_runs_as_background_until_it_stops(make_repo, run_wtbox, wtbox_home, on):
    if cgroups.for_home(wtbox_home) is None:
        pytest.skip(f"no box cgroups here: {cgroups.unavailable(wtbox_home)}")
    if not on:
        wtbox_home.mkdir(parents=True, exist_ok=True)
        (wtbox_home / "config.toml").write_text("[host]\nbackground_busy = false\n")
    repo = make_repo({"burn.py": BURNER}, toml=(
        '[database]\nmode = "none"\n[observability]\nenabled = false\n'
        f'[services.burn]\ncmd = "{sys.executable} burn.py $TMPDIR/spin {os.cpu_count() + 1}"\n'))
    box = json.loads(run_wtbox("new", "spin", "--repo", str(repo), "--json").stdout)
    backend = cgroups.for_home(wtbox_home)
    cpu_idle = backend.cpu_dir(box["id"]) / "cpu.idle"
    if not cpu_idle.exists():
        run_wtbox("rm", "--force", box["id"])
        pytest.skip("this kernel has no cpu.idle (Linux < 5.15)")
    flag = Path(box["dir"]) / "tmp" / "spin"  # the box's own tmp: a sandboxed box sees it
    try:
        time.sleep(1.5)
        assert not backend.background(box["id"])  # a quiet box is a normal box
        flag.touch()
        if on:
            assert wait_for(lambda: backend.background(box["id"]), timeout=10, every=0.1), "never background"
            row, = json.loads(run_wtbox("top", "--json").stdout)
            assert row["background"] is True
            assert "ready (background)" in run_wtbox("top").stdout
            flag.unlink()
            assert wait_for(lambda: not backend.background(box["id"]), timeout=10, every=0.1), "stayed background"
        else:
            time.sleep(2 * (background.LOOKS + 1) * background.WINDOW)  # time enough to have switched
            assert not backend.background(box["id"])
    finally:
        flag.unlink(missing_ok=True)
        run_wtbox("rm", "--force", box["id"])


def test_turned_off_by_the_host_config(tmp_path):
    assert background_wanted(tmp_path)
    (tmp_path / "config.toml").write_text("[host]\nbackground_busy = false\n")
    assert not background_wanted(tmp_path)
    (tmp_path / "config.toml").write_text("[host]\nbackground_busy = 'maybe'\n")
    assert background_wanted(tmp_path)  # a broken config is reported by the commands, not here
