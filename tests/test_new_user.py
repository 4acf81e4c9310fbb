"""What a new user hits first (issue 31): exit codes, Ctrl-C, a broken WTBOX_HOME, task names, state
that lies. The real CLI in a subprocess, real boxes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import CORE_TOML, wait_for


def spawn(args: list[str], home, cwd=None) -> subprocess.Popen:
    env = {**os.environ, "WTBOX_HOME": str(home), "WTBOX_NO_AUTO_GC": "1"}
    return subprocess.Popen([sys.executable, "-m", "worktreebox.cli.main", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)


@pytest.mark.parametrize("args", [["top", "--watch"], ["logs", "{box}", "-f"]])
def test_ctrl_c_ends_watching_commands_with_130(make_repo, run_wtbox, wtbox_home, args):
    """Defect 15: `top --watch` and `logs -f` exited 0 on Ctrl-C; the README promises 130."""
    repo = make_repo(toml=CORE_TOML)
    box = json.loads(run_wtbox("new", "watch", "--json", cwd=repo).stdout)["id"]
    p = spawn([a.format(box=box) for a in args], wtbox_home)
    time.sleep(1.5)  # past its imports, into its loop
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130 and "Traceback" not in err, err
