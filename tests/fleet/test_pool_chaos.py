"""Crash safety of the warm pool: kill -9 the filler and claims at random moments, then
`wtbox gc --grace 0` must leave only live, consistent boxes, and no pooled box may have
gone to two claims."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import CORE_TOML, chaos_rng, git, remove_all_boxes

from worktreebox.system import procs

pytestmark = pytest.mark.chaos

ROUNDS = int(os.environ.get("WTBOX_POOL_CHAOS_ROUNDS", "6"))
SERVICE = '''
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''
TOML = CORE_TOML + f'''
[box]
ports = ["web"]
[services.web]
cmd = "{sys.executable} server.py {{{{ ports.web }}}}"
ready = "tcp:{{{{ ports.web }}}}"
'''


def test_kill_dash_nine_of_filler_and_claims_then_gc(host, make_repo, wtbox_home):
    from worktreebox.box import hex_of
    from worktreebox.fleet import pool as P
    from worktreebox.fleet.gc import _owners, discover_all

    rng = chaos_rng()
    repo = make_repo({"server.py": SERVICE}, toml=TOML)
    host.registry.set_pool_size(str(repo), 2)
    env = {**os.environ, "WTBOX_HOME": str(wtbox_home), "WTBOX_NO_AUTO_GC": "1", "WTBOX_POOL_IDLE": "60"}
    claimed: list[dict] = []
    try:
        for i in range(ROUNDS):
            P.ensure_filler(host, str(repo))
            time.sleep(rng.uniform(0.3, 2.5))
            claims = [subprocess.Popen([sys.executable, "-m", "worktreebox.cli.main", "new", f"c{i}-{k}", "--repo",
                                        str(repo), "--json"], env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL, text=True) for k in range(2)]
            time.sleep(rng.uniform(0.0, 0.6))
            victim = rng.choice(claims)
            victim.send_signal(signal.SIGKILL)
            ident = P._filler_identity(host, str(repo))
            if ident and rng.random() < 0.7:
                os.kill(ident[0], signal.SIGKILL)
            for c in claims:
                out = c.communicate(timeout=120)[0]
                if c.returncode == 0:
                    claimed.append(json.loads(out))
        # Every filler, not only the recorded one: a claim's own ensure_filler may have started one
        # that has not written its identity yet (it does so itself, once its Python is up), and it
        # would make a pooled box while gc runs.
        procs.kill_mentioning(f"worktreebox.fleet.pool\0{wtbox_home}\0")  # (argv: -m MODULE HOME REPO)
        time.sleep(0.2)
        subprocess.run([sys.executable, "-m", "worktreebox.cli.main", "gc", "--grace", "0"], env=env, check=True,
                       capture_output=True, timeout=180)

        boxes = host.list()
        # every box left is alive and whole: ready, its own dir, its branch checked out there
        for b in boxes:
            assert b.state == "ready", (b.id, b.state)
            assert b.dir.is_dir() and not b.dir.is_symlink(), b.id
            assert git(b.path, "rev-parse", "--abbrev-ref", "HEAD").strip() == b.branch
        # nothing found on the host that no registry box answers for
        owners = _owners(boxes)
        found = discover_all(host)
        assert {i for i in found if i not in owners} == set(), {i: found[i] for i in found if i not in owners}
        for entry in (wtbox_home / "boxes").iterdir():
            assert entry.name in owners, entry
            if entry.is_symlink():
                assert entry.resolve().is_dir(), entry
        # claims that succeeded got distinct boxes, and those still listed are theirs
        hexes = [hex_of(c["id"]) for c in claimed]
        assert len(hexes) == len(set(hexes)), hexes
        listed = {b.id for b in boxes}
        assert all(c["id"] in listed for c in claimed if c["from_pool"])
    finally:
        P.stop_filler(host, str(repo))
        remove_all_boxes(host)
