"""fsutil: the one atomic write, used by threads of one process at once (fan-out makes boxes in threads)."""
from __future__ import annotations

import threading

from worktreebox.system.fsutil import atomic_write


def test_atomic_write_from_many_threads_at_once(tmp_path):
    errors = []
    barrier = threading.Barrier(8)
    def write(i):
        barrier.wait()
        try:
            for _ in range(50):
                atomic_write(tmp_path / "f.json", f"{i}\n")
        except Exception as e:
            errors.append(e)
    ts = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == [] and (tmp_path / "f.json").read_text().strip().isdigit()
