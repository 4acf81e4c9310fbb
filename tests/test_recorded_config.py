"""The config a box was made with is recorded and is what up/restart use; `up --reload` applies the
box's own edited wtbox.toml (config/recorded.py). Real boxes, real services."""
from __future__ import annotations

import json
import sys
import urllib.request

import pytest
from helpers import CORE_TOML

PY = sys.executable


# Answers its second argument on / (the text says which config started it).
SERVER = """
import http.server, sys
text = sys.argv[2].encode()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(text)
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def serve(text: str) -> str:
    """A service answering `text` on / at the box's web port (server.py is committed in every repo here)."""
    return f"""
[services.web]
cmd = "{PY} server.py {{{{ ports.web }}}} {text}"
ready = "http://127.0.0.1:{{{{ ports.web }}}}/"
ready_timeout = "20s"
"""


def answer(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()


def test_up_after_down_uses_the_config_the_box_was_made_with(make_repo, run_wtbox):
    """Defect 1: `new` read the main checkout's uncommitted [services.web]; `up` after `down` re-read
    the worktree's committed file and said "has no services" (and ran an old cmd when it changed)."""
    repo = make_repo({"server.py": SERVER}, toml=CORE_TOML)
    (repo / "wtbox.toml").write_text(CORE_TOML + serve("first"))  # uncommitted
    out = json.loads(run_wtbox("new", "rec", "--json", cwd=repo).stdout)
    assert answer(out["ports"]["web"]) == "first"
    run_wtbox("down", out["id"])
    (repo / "wtbox.toml").write_text(CORE_TOML + serve("second"))  # the main checkout moves on
    run_wtbox("up", out["id"], "--json")
    assert answer(out["ports"]["web"]) == "first"
    run_wtbox("restart", out["id"])
    assert answer(out["ports"]["web"]) == "first"
    status = json.loads(run_wtbox("status", out["id"], "--json").stdout)
    assert status["config"]["source"] == str(repo / "wtbox.toml")


def test_up_reload_applies_the_boxs_own_wtbox_toml_and_records_it(make_repo, run_wtbox):
    repo = make_repo({"server.py": SERVER}, toml=CORE_TOML + serve("first"))
    out = json.loads(run_wtbox("new", "rel", "--json", cwd=repo).stdout)
    port, path = out["ports"]["web"], out["path"]
    before = json.loads(run_wtbox("status", out["id"], "--json").stdout)["config"]["sha256"]
    # an agent edits its services inside its box
    (repo.parent / path / "wtbox.toml").write_text(CORE_TOML + serve("edited"))
    run_wtbox("up", out["id"])
    assert answer(port) == "first"  # not without --reload
    run_wtbox("up", out["id"], "--reload")
    assert answer(port) == "edited"
    status = json.loads(run_wtbox("status", out["id"], "--json").stdout)
    assert status["config"]["sha256"] != before and status["config"]["source"].endswith("(reloaded)")
    run_wtbox("down", out["id"])
    run_wtbox("up", out["id"])
    assert answer(port) == "edited"  # recorded: every later up uses it


def test_up_reload_refuses_what_it_cannot_apply_and_changes_nothing(make_repo, run_wtbox):
    repo = make_repo({"server.py": SERVER}, toml=CORE_TOML + serve("first"))
    out = json.loads(run_wtbox("new", "ref", "--json", cwd=repo).stdout)
    (repo.parent / out["path"] / "wtbox.toml").write_text(
        CORE_TOML.replace('mode = "none"', 'mode = "schema"') + serve("edited"))
    proc = run_wtbox("up", out["id"], "--reload", check=False)
    assert proc.returncode == 2 and "[database] changed" in proc.stderr and "Traceback" not in proc.stderr
    assert answer(out["ports"]["web"]) == "first"


@pytest.mark.parametrize("action", ["down", "restart"])
def test_reload_is_only_for_up(make_repo, run_wtbox, action):
    proc = run_wtbox(action, "x", "--reload", check=False)
    assert proc.returncode == 2 and "--reload" in proc.stderr
