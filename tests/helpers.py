"""Small helpers shared by the test modules and fixture plugins."""
from __future__ import annotations

import time


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
