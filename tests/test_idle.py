"""What keeps an idle box idle (issue 27), each part on the real thing where the kernel is involved:
the services' output files in memory (tmpfs, inotify, punched holes), the store that sleeps in a
frozen cgroup leaf, the box watch's calm cadence, one walk of /proc for many scans."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import wait_for

from worktreebox.services import output
from worktreebox.system import appendfiles, background, cgroups, procfs, procs
from worktreebox.telemetry import store_sleep
from worktreebox.telemetry.logs.writer import LogWriter

# ---------------------------------------------------------------- output files


@pytest.fixture
def out_dir(tmp_path):
    d = appendfiles.box_dir("test" + os.urandom(2).hex(), "0123abcd", tmp_path / "fallback")
    yield d
    output.remove(d)


def _msgs(logs: Path, service: str = "web") -> list[str]:
    path = logs / f"{service}.jsonl"
    return [json.loads(line)["msg"] for line in path.read_text().splitlines()] if path.exists() else []


def test_output_files_are_logged_as_written_and_freed(out_dir, tmp_path):
    logs = tmp_path / "logs"
    out = output.Output(out_dir, lambda s: LogWriter(logs, s))
    try:
        fd_out, fd_err = out.files_for("web")
        code = ("import sys\nprint('x' * 5000, flush=True)\n"
                "for i in range(200): print(f'line {i}', flush=True)\nprint('oops', file=sys.stderr)")
        p = subprocess.Popen([sys.executable, "-c", code], stdout=fd_out, stderr=fd_err)
        os.close(fd_out)
        os.close(fd_err)
        p.wait()
        time.sleep(0.3)
        assert _msgs(logs) == []  # held until its start event was written (`new` shows lines since it)
        out.started("web")
        # inotify wakes the follower: no finish() needed for complete lines
        assert wait_for(lambda: "line 199" in _msgs(logs), timeout=5)
        out.finish("web")
    finally:
        out.close()
    msgs = _msgs(logs)
    assert "oops" in msgs  # stderr: its own file (between the streams no order is kept, as between two pipes)
    assert [m for m in msgs if m != "oops"] == ["x" * 5000] + [f"line {i}" for i in range(200)]
    st = os.stat(out_dir / "web.stdout")
    assert st.st_size > 5000 and st.st_blocks * 512 <= 4096  # consumed pages were given back (all but the last)


def test_the_follower_sleeps_between_writes_and_ends_a_lone_traceback(out_dir, tmp_path):
    """Freeing what it read is a modification inotify reports too: it must not wake it for ever.
    A traceback with nothing after it on its stream is written once the output was quiet."""
    logs = tmp_path / "logs"
    out = output.Output(out_dir, lambda s: LogWriter(logs, s))
    try:
        fd_out, fd_err = out.files_for("web")
        out.started("web")
        os.write(fd_err, b"Traceback (most recent call last):\n  File \"x\", line 1\nValueError: no\n")
        os.write(fd_out, b"after\n")
        assert wait_for(lambda: any(m.startswith("Traceback") for m in _msgs(logs)), timeout=5)
        t0 = time.process_time()
        time.sleep(1)
        assert time.process_time() - t0 < 0.05  # asleep in select: no wake-up of its own making
        os.close(fd_out)
        os.close(fd_err)
    finally:
        out.close()


def test_a_new_follower_logs_what_nobody_read_and_nothing_twice(out_dir, tmp_path):
    """A supervisor killed with kill -9 leaves the files: the next one starts where the first stopped."""
    logs = tmp_path / "logs"
    first = output.Output(out_dir, lambda s: LogWriter(logs, s))
    fd_out, fd_err = first.files_for("web")
    first.started("web")
    os.write(fd_out, b"read by the first\n" + b"y" * 3000 + b"\n")
    assert wait_for(lambda: len(_msgs(logs)) == 2, timeout=5)
    first._closed = True  # as if killed: nobody follows any more
    os.write(first._wake_w, b"x")
    first.thread.join(5)
    os.write(fd_out, b"written while nobody read\nunfinished")
    os.close(fd_out)
    os.close(fd_err)
    second = output.Output(out_dir, lambda s: LogWriter(logs, s))
    second.finish("web")
    second.close()
    assert _msgs(logs) == ["read by the first", "y" * 3000, "written while nobody read", "unfinished"]


def test_start_of_data_skips_what_was_released(tmp_path):
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.write(b"a" * 10000 + b"rest")
    fd = os.open(path, os.O_RDWR)
    try:
        appendfiles.release(fd, 10000)
        where = appendfiles.start_of_data(fd)
        # on tmpfs/ext4 the hole is skipped; where holes are not kept the file reads from the start
        assert where in (10000, 0)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the store sleeps


class FakeStore:
    """What StoreSleep asks of the store: the marker is the truth (a reader may wake it meanwhile)."""

    def __init__(self, run_dir) -> None:
        self.run_dir = run_dir
        self.sleeping = False
        self.calls: list[str] = []

    def asleep(self) -> bool:
        return self.sleeping

    def sleep(self) -> None:
        self.sleeping = True
        self.calls.append("sleep")

    def wake(self) -> None:
        self.sleeping = False
        self.calls.append("wake")


def test_a_calm_box_store_sleeps_and_activity_reads_and_pushes_wake_it(tmp_path):
    now = [1000.0]
    store = FakeStore(tmp_path)
    s = store_sleep.StoreSleep(store, clock=lambda: now[0])
    s.look(active=False)
    assert not s.asleep  # a new box stays awake SLEEP_AFTER
    now[0] += store_sleep.SLEEP_AFTER
    s.look(active=False)
    assert s.asleep and store.calls == ["sleep"]
    s.look(active=True)
    assert not s.asleep  # the box works again
    now[0] += store_sleep.SLEEP_AFTER
    s.look(active=False)
    assert s.asleep
    s.for_push()
    assert not s.asleep  # a push wakes it, for PUSH_LINGER
    now[0] += store_sleep.PUSH_LINGER
    s.look(active=False)
    assert s.asleep
    store_sleep.stamp_read(tmp_path)  # `wtbox metrics` read it (and had it woken through the supervisor)
    now[0] = time.time()
    store.sleeping = False
    s.look(active=False)
    assert not store.sleeping  # a read keeps it awake READ_LINGER
    now[0] += store_sleep.READ_LINGER
    s.look(active=False)
    assert store.sleeping


def test_a_store_found_asleep_stays_asleep_until_something_wants_it(tmp_path):
    """A supervisor that finds its store asleep (its killed predecessor's sleep, or a test's) woke it
    at its first looks only because it was young: `test_store_sleep` saw the store it had just put
    to sleep running again now and then. A read, a push or activity wakes it; youth only delays sleep."""
    now = [1000.0]
    store = FakeStore(tmp_path)
    store.sleeping = True
    s = store_sleep.StoreSleep(store, clock=lambda: now[0])
    s.look(active=False)
    assert store.sleeping and store.calls == []
    s.look(active=True)
    assert not store.sleeping  # activity wakes it
    s.look(active=False)
    assert not store.sleeping  # and the young box's grace keeps it awake


@pytest.mark.skipif(cgroups.detect("probe")[0] is None, reason="no cgroups here")
def test_a_frozen_leaf_is_thawed_and_killed(tmp_path):
    """A leaf left frozen (a snapshot killed half-way, an older wtbox's sleeping store): on v1 a
    frozen task takes no signal, not even SIGKILL; kill thaws it first."""
    backend, _ = cgroups.detect(cgroups.home_key(tmp_path / "home"))
    box = "idle-0badcafe"
    backend.create(box, cgroups.Limits())
    p = subprocess.Popen(["sleep", "300"], preexec_fn=backend.placer(box, cgroups.METRICS))
    try:
        assert backend.freeze(box, True) or pytest.skip("no freezer here")
        assert backend.frozen(box) == [cgroups.METRICS]  # reported: nothing freezes a store on purpose now
        assert procfs.stat_fields(p.pid) is not None
        assert backend.kill(box) == {p.pid}
        assert p.wait(5) == -9
    finally:
        if p.poll() is None:
            p.kill()
        backend.remove(box)


# ---------------------------------------------------------------- the box watch


def test_a_calm_box_is_only_measured_and_an_active_one_looked_at():
    used = [0.0]
    looked: list[int] = []
    watch = background.BusyWatch(lambda: looked.append(1) or [], lambda on: True, cpus=2,
                                 cpu_seconds=lambda: used[0], clock=iter(range(0, 10**6, 4)).__next__)
    assert watch.step() == background.WINDOW  # nothing to compare with: as if active
    assert watch.step() == background.QUIET_WINDOW and not watch.active
    n = len(looked)
    assert watch.step() == background.QUIET_WINDOW and len(looked) == n  # calm: no walk of its threads
    used[0] += 1.0  # a core's quarter over the next 4 s
    assert watch.step() == background.WINDOW and watch.active and len(looked) == n + 1


def test_one_walk_serves_every_scan_inside_it(monkeypatch):
    walks = []
    real = procfs.pids
    monkeypatch.setattr(procfs, "pids", lambda: walks.append(1) or real())
    with procs.one_walk():
        procs.find_box_processes("nobody-00000000", None)
        procs.discover_box_ids("/nonexistent/boxes")
        procs.find_named("nobody-00000000", ["victoria-metrics"])
    assert len(walks) == 1
    procs.discover_box_ids("/nonexistent/boxes")
    assert len(walks) == 2  # outside, every scan walks afresh


# ---------------------------------------------------------------- a real idle box


def test_an_idle_box_has_one_wtbox_process_and_keeps_its_output_in_memory(make_repo, run_wtbox, wtbox_home):
    """One wtbox process per box: the supervisor (the OTLP endpoint inside it), no keeper."""
    server = ("import http.server, os\nprint('hello', flush=True)\nhttp.server.HTTPServer(('127.0.0.1', "
              "int(os.environ['PORT'])), http.server.SimpleHTTPRequestHandler).serve_forever()\n")
    repo = make_repo({"server.py": server}, toml='[box]\nports = ["web"]\n[database]\nmode = "none"\n'
                     '[services.web]\ncmd = "python3 server.py"\nready = "tcp:{{ ports.web }}"\n')
    box = json.loads(run_wtbox("new", "idle", "--repo", str(repo), "--json").stdout)
    try:
        mine = [p for p in procfs.pids() if procfs.environ_value(procfs.environ(p) or b"", "WTBOX_ID") == box["id"]]
        wtbox = [p for p in mine if any("worktreebox" in a for a in procfs.cmdline(p))]
        assert len(wtbox) == 1 and "worktreebox.services.supervisor" in procfs.cmdline(wtbox[0])
        assert box["traces"]["up"]
        shm = output.directory(wtbox_home, box["id"])
        assert (shm / "web.stdout").exists() and oct(shm.stat().st_mode & 0o777) == "0o700"
        assert wait_for(lambda: "hello" in run_wtbox("logs", box["id"]).stdout, timeout=5)
    finally:
        run_wtbox("rm", "--force", box["id"])
    assert not output.directory(wtbox_home, box["id"]).exists()


def test_a_box_without_services_gets_its_endpoint_back_with_up(make_repo, run_wtbox, wtbox_home):
    """Its supervisor serves the OTLP endpoint alone; killed, the box is degraded and `up` restarts it."""
    import signal

    repo = make_repo(toml='[database]\nmode = "none"\n')
    box = json.loads(run_wtbox("new", "bare", "--repo", str(repo), "--json").stdout)
    try:
        pid = int((Path(box["dir"]) / "run" / "supervisor.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        st = json.loads(run_wtbox("status", box["id"], "--json").stdout)
        assert st["state"] == "degraded" and not st["traces"]["up"]
        run_wtbox("up", box["id"])
        st = json.loads(run_wtbox("status", box["id"], "--json").stdout)
        assert st["state"] == "ready" and st["traces"]["up"]
        run_wtbox("down", box["id"])  # no services to stop; the endpoint stays
        assert json.loads(run_wtbox("status", box["id"], "--json").stdout)["traces"]["up"]
    finally:
        run_wtbox("rm", "--force", box["id"])


@pytest.mark.skipif(cgroups.detect("probe")[0] is None, reason="no cgroups here")
def test_an_oom_kill_in_a_box_is_an_event(tmp_path):
    """The supervisor sleeps on it (no polling): the kernel's OOM killer acting in the box wakes the wait."""
    import threading

    backend, _ = cgroups.detect(cgroups.home_key(tmp_path / "home"))
    if "memory" in backend.missing:
        pytest.skip("no memory controller here")
    box = "oom-0badf00d"
    backend.create(box, cgroups.Limits(memory_max=64 << 20))
    try:
        wait = backend.oom_event(box)
        assert wait is not None
        woke: list[bool] = []
        t = threading.Thread(target=lambda: woke.append(wait()), daemon=True)
        t.start()
        time.sleep(0.2)
        assert not woke  # nothing happened: the wait sleeps
        hog = subprocess.Popen([sys.executable, "-c", "x = bytearray(256 << 20); x[::4096] = b'1' * len(x[::4096])"],
                               preexec_fn=backend.placer(box, "hog"))
        assert hog.wait(30) == -9
        t.join(10)
        assert woke == [True] and backend.oom_kills(box).get("hog") == 1
    finally:
        backend.remove(box)


def test_more_followed_boxes_than_the_users_inotify_instances(tmp_path):
    """Every box's supervisor follows one directory, all as one user: past the user's inotify
    instances (128 by default) the 129th supervisor could not start. Each watch still wakes for a
    write to its own directory, and for nothing else of its own."""
    import select

    limit = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
    n = min(limit + 8, 2000)
    dirs = [tmp_path / f"box{i}" for i in range(n)]
    watches = []
    try:
        for d in dirs:
            d.mkdir()
            watches.append(appendfiles.Watch(d))
        last = watches[-1]
        for w in watches:
            w.drain()
        fd = os.open(dirs[-1] / "web.stdout", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.write(fd, b"hello\n")
        os.close(fd)
        ready, _, _ = select.select([last.fileno()], [], [], 5)
        assert ready == [last.fileno()]
        last.drain()
        ready, _, _ = select.select([last.fileno()], [], [], 0.3)
        assert ready == []  # drained, and nothing new was written
    finally:
        for w in watches:
            w.close()
