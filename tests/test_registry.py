"""The registry under concurrency: many `wtbox` processes open (and create) it at once."""
import subprocess
import sys
import time

import pytest
from helpers import ROOT

OPEN = """
import sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from worktreebox.registry import Registry
start = float(sys.argv[2])
while time.time() < start:
    pass
Registry(Path(sys.argv[1])).select_box_ids()
"""


@pytest.mark.slow
def test_many_processes_creating_the_registry_at_once_all_get_it(tmp_path):
    """Switching a new database to WAL takes an exclusive lock for which SQLite does not wait:
    five `new` in a fresh home used to fail one of them with 'database is locked'."""
    script = OPEN.format(root=str(ROOT))
    for round_ in range(8):
        path = tmp_path / f"r{round_}" / "registry.sqlite3"
        start = time.time() + 0.4
        procs = [subprocess.Popen([sys.executable, "-c", script, str(path), str(start)], stderr=subprocess.PIPE,
                                  text=True) for _ in range(8)]
        errors = [p.communicate()[1] for p in procs if p.wait() != 0]
        assert not errors, f"round {round_}: {len(errors)} of 8 failed: {errors[0].strip().splitlines()[-1]}"
