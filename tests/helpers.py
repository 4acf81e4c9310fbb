"""Small helpers shared by the test modules and fixture plugins."""
from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository
APPS = Path(__file__).resolve().parent / "apps"  # small programs the tests run as services

# A repo config for tests of the core only: no database, no observability stack.
CORE_TOML = """
[database]
mode = "none"
[observability]
enabled = false
"""

# A creation that stays in [setup] for two minutes: where a test cancels or kills it.
SLOW_SETUP_TOML = """
[setup]
cmd = "echo setting up; sleep 120"
[database]
mode = "none"
[observability]
enabled = false
"""


def git(cwd: Path, *args: str) -> str:
    """Run git in `cwd` and return its stdout (raises on failure). A sandboxed box's worktree belongs
    to the box's user, and git refuses another user's repository unless told it is safe: the tests
    look at boxes' worktrees from the host on purpose (wtbox itself asks inside the box)."""
    return subprocess.run(["git", "-c", "safe.directory=*", "-C", str(cwd), *args], check=True, capture_output=True,
                          text=True).stdout


def wait_for(fn, timeout: float = 15.0, every: float = 0.25):
    """Poll fn() until it returns something truthy; the last value is returned (or asserted)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def remove_all_boxes(host) -> None:
    """Leave nothing behind even when a test failed half-way, then close the registry."""
    for b in host.list():
        try:
            host.rm(b.id, force=True)
        except Exception:
            pass
    host.registry.close()
    remove_box_cgroups(host.home)  # also of boxes whose row a test deleted on purpose


def remove_box_cgroups(home) -> None:
    """Kill and delete the cgroups of every box of `home`, then its services' output files on
    /dev/shm (both outlive the test's tmp dir otherwise)."""
    import shutil

    from worktreebox.system import appendfiles, cgroups

    backend = cgroups.for_home(home)
    if backend is not None:
        for box_id in backend.box_keys():
            backend.remove(box_id)
    for directory in appendfiles.dirs_of_home(cgroups.home_key(home)).values():
        shutil.rmtree(directory, ignore_errors=True)


def stop_router(home) -> None:
    """Stop the router (Caddy) of `home` if one runs: a test that left boxes behind leaves it too."""
    from worktreebox.router import caddy
    from worktreebox.router.state import read_state

    caddy.stop(read_state(Path(home)).get("pid"))


def stop_routers_under(tmp) -> None:
    """Stop every router whose home lies under `tmp`, also of a home the test deleted."""
    from worktreebox.system import procs

    for pid in procs.pids_named("caddy"):
        if any(a.startswith(f"{tmp}/") for a in procs.cmdline(pid)):
            procs.stop_pid(pid)


# A service that spins `argv[2]` processes, each in a session of its own, while the file argv[1]
# exists (tests of fair CPU and of background boxes, and scripts/bench_cgroups.py).
BURNER = (APPS / "burner.py").read_text()


SANDBOX_OWN = ("bwrap", "slirp4netns", "worktreebox.services.supervisor", "worktreebox.services.zygote",
               "sleep infinity")


def box_runs(box_id: str, box_dir: Path) -> list[str]:
    """Command lines of a box's processes other than wtbox's own that stay while the box lives (a
    sandboxed box's holder, slirp4netns, supervisor): what a stopped run must not leave."""
    from worktreebox.system import procs

    found = [" ".join(p.cmdline()) for p in procs.find_box_processes(box_id, box_dir)]
    return [c for c in found if c and not any(o in c for o in SANDBOX_OWN)]


def box_pids(box_id: str) -> set[int]:
    """Live (not zombie) processes whose environment carries WTBOX_ID=<box_id>."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"WTBOX_ID={box_id}".encode() in env and state != "Z":
            found.add(int(pid))
    return found


def redis_cmd(port: int, *words: str) -> bytes:
    """One Redis command in RESP on 127.0.0.1:port; the raw reply."""
    body = f"*{len(words)}\r\n" + "".join(f"${len(w)}\r\n{w}\r\n" for w in words)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(body.encode())
        return s.recv(4096)


def port_bindable(port: int) -> bool:
    """Free for a new server: bindable with SO_REUSEADDR (as servers and portpicker bind; the closed
    connections of the old server may linger in TIME_WAIT)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def chaos_rng() -> random.Random:
    """The random choices of a chaos test, from WTBOX_CHAOS_SEED or the clock; the seed is printed,
    so a failure shows it and `WTBOX_CHAOS_SEED=<seed>` makes the same kills again."""
    seed = int(os.environ.get("WTBOX_CHAOS_SEED", time.time()))
    print(f"WTBOX_CHAOS_SEED={seed}")
    return random.Random(seed)


class Running:
    """The home's zygote, started as the CLI server starts it (services/zygote.py), until `end`."""

    def __init__(self, home: Path) -> None:
        import psutil

        from worktreebox.services import zygote

        (home / "run").mkdir(parents=True, mode=0o700, exist_ok=True)
        # as the CLI server starts it: with the server's umask (077), not its callers'
        before = os.umask(0o077)
        try:
            started = zygote.start(str(home))
        finally:
            os.umask(before)
        assert started is not None
        self.alive_fd, self.pid = started
        self.socket = home / "run" / zygote.SOCKET
        assert wait_for(lambda: self.socket.exists() or not psutil.pid_exists(self.pid), timeout=30, every=0.05)
        assert self.socket.exists(), (home / "run" / zygote.LOG).read_text()

    def end(self) -> None:
        from worktreebox.system import procs

        if self.alive_fd >= 0:
            os.close(self.alive_fd)
            self.alive_fd = -1
        wait_for(lambda: not procs.pid_alive(self.pid), timeout=10, every=0.05)
