"""[box] disk_max where no filesystem can enforce it (resources/disk.py): watched by the box's supervisor.

Every few seconds it counts the box's own bytes (its directory, not the shared trees and layers
mounted into it); past the limit it writes an `error` event and freezes every process of the box
but its supervisor (the cgroup freezer: a process writing stops where it is, a new one stops as it
starts), and marks the box (`run/disk-full`: `status`/`ls` then say degraded and why). When the box
is under its limit again (files deleted from outside it) the processes are thawed.

The count is a walk of the box dir, so the pause between counts is at least 20 times what the last
one took (at most 5% of a CPU, whatever the box holds). Between two counts a box can write past
its limit by what it writes in that pause: watching bounds, it does not enforce.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

EVERY = 2.0  # seconds between counts at least
COST_FACTOR = 20
FULL_MARK = "disk-full"  # in run/: the box is frozen for its disk_max


class DiskWatch:
    def __init__(self, box_dir: Path, limit: int, *, measure: Callable[[], int], freeze: Callable[[bool], None],
                 event: Callable[[str, str], None]) -> None:
        self.box_dir, self.limit = box_dir, limit
        self.measure, self.freeze, self.event = measure, freeze, event
        self.frozen = False

    @property
    def mark(self) -> Path:
        return self.box_dir / "run" / FULL_MARK

    def check(self) -> float:
        """One count; the seconds it took."""
        t0 = time.monotonic()
        used = self.measure()
        took = time.monotonic() - t0
        over = used > self.limit
        if over:
            self.freeze(True)  # again each time: a process started since then is in a leaf not yet frozen
        if over and not self.frozen:
            self.mark.write_text(f"{used}\n")
            self.event("error", f"the box uses {_mib(used)} of its own, past its disk_max of {_mib(self.limit)}: "
                                "its processes are frozen until files are deleted from it")
        elif self.frozen and not over:
            self.freeze(False)
            self.mark.unlink(missing_ok=True)
            self.event("info", f"the box uses {_mib(used)}, under its disk_max again: its processes are thawed")
        self.frozen = over
        return took

    def run(self, wait: Callable[[float], bool]) -> None:
        """Count until `wait(pause)` says the supervisor is done; thaw on the way out."""
        try:
            while not wait(max(EVERY, COST_FACTOR * self.check())):
                pass
        finally:
            if self.frozen:
                self.freeze(False)
                self.mark.unlink(missing_ok=True)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
