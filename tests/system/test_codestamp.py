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


def test_an_asker_that_runs_this_code_is_served_without_a_walk_and_any_other_after_one(monkeypatch):
    from worktreebox.system import codestamp

    stamp = code_stamp()
    own = codestamp.digest(stamp)
    walks = []
    monkeypatch.setattr(codestamp, "code_stamp", lambda: walks.append(1) or {**stamp, "/x.py": (1, 1)})
    assert codestamp.changed_since(stamp, own, own) is None and walks == []
    assert codestamp.changed_since(stamp, own, None) == "/x.py"  # nothing checked the asker's code
    assert codestamp.changed_since(stamp, own, "0" * 32) == "/x.py"  # it runs other code
    assert len(walks) == 2
    assert codestamp.digest(dict(reversed(stamp.items()))) == own  # the same files, in any order
