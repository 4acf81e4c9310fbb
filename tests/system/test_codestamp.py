"""The code stamp a warm process (the CLI server, the supervisors' zygote) compares before it serves."""
from __future__ import annotations

from pathlib import Path

import worktreebox
from worktreebox.system.codestamp import code_stamp

PACKAGE = Path(worktreebox.__file__).resolve().parent


def test_the_stamp_covers_every_module_of_wtbox_not_only_the_cli():
    """A server stamped only worktreebox/cli/: an edit of host.py went on being served stale."""
    stamped = {Path(p) for p in code_stamp()}
    for module in ("host.py", "services/supervisor.py", "resources/sandbox.py", "cli/server.py"):
        assert PACKAGE / module in stamped, module
