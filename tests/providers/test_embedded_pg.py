"""The embedded cluster as root: it runs as an unprivileged user, so the path to its data dir
must stay passable for that user even when something closes it after initdb."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

pytestmark = pytest.mark.slow  # starts and stops a real cluster

@pytest.mark.skipif(os.geteuid() != 0, reason="the unprivileged cluster user exists only when wtbox runs as root")
def test_stop_and_start_work_after_an_ancestor_was_closed_again(monkeypatch):
    from pathlib import Path

    monkeypatch.delenv("WTBOX_POSTGRES_URL", raising=False)
    # Not under tmp_path: pytest sessions running beside this one reset /tmp/pytest-of-root to
    # 0700 whenever they start, which is the very thing under test, but at random moments.
    outer = Path(tempfile.mkdtemp(prefix="wtbox-pgperm-"))
    home = outer / "home"
    env = {**os.environ, "WTBOX_HOME": str(home), "WTBOX_NO_AUTO_GC": "1"}
    env.pop("WTBOX_POSTGRES_URL", None)

    def db(*args):
        return subprocess.run([sys.executable, "-m", "worktreebox.cli.main", "db", *args], env=env,
                              capture_output=True, text=True, timeout=120)

    try:
        assert db("start").returncode == 0
        os.chmod(outer, 0o700)  # what a new pytest session does to /tmp/pytest-of-root
        r = db("stop")
        assert r.returncode == 0, r.stderr
        os.chmod(outer, 0o700)
        r = db("start")
        assert r.returncode == 0, r.stderr
    finally:
        db("stop")
        shutil.rmtree(outer, ignore_errors=True)
