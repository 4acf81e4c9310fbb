"""Small helpers shared by the test modules and fixture plugins."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

# A repo config for tests of the core only: no database, no observability stack.
CORE_TOML = """
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
    """Kill and delete the cgroups of every box of `home` (they outlive the test's tmp dir otherwise)."""
    from worktreebox.system import cgroups

    backend = cgroups.for_home(home)
    if backend is not None:
        for box_id in backend.box_keys():
            backend.remove(box_id)


# A service that spins `argv[2]` processes, each in a session of its own, while the file argv[1]
# exists (tests of fair CPU and of background boxes, and scripts/bench_cgroups.py).
BURNER = (Path(__file__).parent / "services" / "burner.py").read_text()
