"""A box's caches against real boxes (the default home here is sandboxed): Python bytecode.

A sandboxed box shares nothing writable with another box, bytecode included. It used to get a
bytecode prefix of its own (PYTHONPYCACHEPREFIX in its cache dir), which hides the interpreter's
own precompiled standard library: the first Python process of every new box compiled everything
it imported again (`python -c pass` 150 ms instead of 40; a service's first start with it).
"""
from __future__ import annotations

import json

from helpers import CORE_TOML, git

from worktreebox.operations import boxes as box_ops
from worktreebox.providers.sandbox import sandboxed

PROBE = ("import json, os, sys; "
         "print(json.dumps({'cached': json.__spec__.cached, 'there': os.path.exists(json.__spec__.cached), "
         "'prefix': sys.pycache_prefix}))")


def run_in(host, box, cmd: str) -> str:
    out = box_ops.run(host, box.id, cmd, timeout=60, tail=5000)
    assert out["exit_code"] == 0, out
    return out["stdout"]


def test_a_sandboxed_box_uses_the_interpreters_own_bytecode_and_keeps_its_own_to_itself(host, make_repo):
    import sys

    repo = make_repo({"mod.py": "VALUE = 42\n"}, toml=CORE_TOML)
    box = host.new("bytecode", repo=repo)
    assert sandboxed(box)
    seen = json.loads(run_in(host, box, f"{sys.executable} -c \"{PROBE}\"").strip().splitlines()[-1])
    assert seen["prefix"] is None, seen  # no prefix that hides the standard library's .pyc files
    assert seen["there"] and not seen["cached"].startswith(str(box.dir)), seen

    # The box's own source: compiled where it is imported, never written as bytecode. Written, it
    # was checked by the source's mtime in seconds and its size: an edit of the same size within the
    # second of the last import (what an agent does) ran the old code (test_fanout failed so).
    stale = ("import mod; import os; st = os.stat('mod.py'); "
             "open('mod.py', 'w').write('VALUE = 43\\n'); os.utime('mod.py', ns=(st.st_atime_ns, st.st_mtime_ns))")
    run_in(host, box, f'{sys.executable} -c "{stale}"')
    assert run_in(host, box, f"{sys.executable} -c 'import mod; print(mod.VALUE)'").strip() == "43"
    assert not (box.path / "__pycache__").exists()
    (box.path / "mod.py").write_text("VALUE = 42\n")
    assert git(box.path, "status", "--porcelain").strip() == ""
    host.rm(box.id)  # refuses unsaved work without force: there is none
    assert not box.dir.exists()
