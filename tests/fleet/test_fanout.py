"""Fan-out, compare and pick, end to end through the CLI: real git, PostgreSQL, VictoriaMetrics, services."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import CORE_TOML, box_runs, git

PY = sys.executable
# Other wtbox homes may be live on this host at the same time (other suites): ports are leased
# per home, so this module's homes use a range of their own.
HOST_CONFIG = '[host]\nport_range = "24100-24399"\n'

APP = """\
DELAY = 0.0


def add(a, b):
    return a - b


def mul(a, b):
    return a * b
"""

TESTS = """\
from app import add, mul


def test_add():
    assert add(2, 3) == 5


def test_mul():
    assert mul(2, 3) == 6
"""

SERVER = """\
import http.server
import sys
import time

import app


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(app.DELAY)
        body = str(app.add(2, 3)).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""

TOML = f"""\
[box]
ports = ["web"]

[database]
mode = "schema"

[services.web]
cmd = "{PY} server.py {{{{ ports.web }}}}"
ready = "http://127.0.0.1:{{{{ ports.web }}}}/"
"""

# Attempt i: 1 and 2 fix the bug (two ways), 3 breaks another function, 4 fixes it but makes
# the server slow, 5 leaves a half-done file and crashes. Each records the env it saw.
ATTEMPT = """\
import json, os, pathlib, sys

i, seen, box = int(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
try:
    seen.mkdir(exist_ok=True)
except OSError:  # a sandboxed box writes nothing of the host's: its own home then
    seen = pathlib.Path(os.environ["HOME"], "seen")
    seen.mkdir(exist_ok=True)
keys = ("WTBOX_ID", "PORT", "DATABASE_URL", "WTBOX_FANOUT_INDEX", "WTBOX_FANOUT_N")
(seen / f"{i}.json").write_text(json.dumps({"box": box, "cwd": os.getcwd(), **{k: os.environ.get(k) for k in keys}}))
src = pathlib.Path("app.py").read_text()
if i == 1:
    src = src.replace("return a - b", "return a + b")
elif i == 2:
    src = src.replace("return a - b", "return sum((a, b))")
elif i == 3:
    src = src.replace("return a * b", "return a ** b")
elif i == 4:
    src = src.replace("return a - b", "return a + b").replace("DELAY = 0.0", "DELAY = 0.2")
elif i == 5:
    pathlib.Path("NOTES.md").write_text("half done\\n")
    print("error: the agent crashed", file=sys.stderr)
    sys.exit(3)
pathlib.Path("app.py").write_text(src)
print(f"attempt {i} applied with", os.environ["DATABASE_URL"])
"""


@pytest.fixture
def home(wtbox_home, host):
    """WTBOX_HOME with this module's port range; `host` cleans up every box afterwards."""
    wtbox_home.mkdir(parents=True, exist_ok=True)
    (wtbox_home / "config.toml").write_text(HOST_CONFIG)
    return wtbox_home


def _seen(seen: Path, box_dir: Path, i: int) -> str:
    """What attempt i recorded: where it was told, or in its box's own home (a sandboxed box)."""
    told = seen / f"{i}.json"
    return (told if told.exists() else box_dir / "home" / "seen" / f"{i}.json").read_text()


def rows_by_index(rows: list[dict]) -> dict[int, dict]:
    return {r["index"]: r for r in rows}


def test_fanout_compare_pick_end_to_end(home, host, make_repo, run_wtbox, tmp_path, pg_cluster):
    # the attempt is the repo's (a sandboxed box's user cannot read pytest's 0700 tmp dirs)
    repo = make_repo({"app.py": APP, "test_app.py": TESTS, "server.py": SERVER, "attempt.py": ATTEMPT}, toml=TOML)
    seen = tmp_path / "seen"

    proc = run_wtbox("fanout", "fix", "-n", "5", "--repo", str(repo),
                     "--run", f"{PY} attempt.py {{i}} {seen} {{box}}",
                     "--check", f"{PY} -m pytest -q -p no:cacheprovider", "--probe", "/", "--probe-requests", "40",
                     "--json", timeout=120, check=False)
    rows = json.loads(proc.stdout)
    by = rows_by_index(rows)
    assert proc.returncode == 1 and "attempts failed their run or checks" in proc.stderr  # some attempts fail
    assert sorted(by) == [1, 2, 3, 4, 5]
    assert all(r["state"] == "done" and r["error"] is None for r in rows), rows
    assert [r["task"] for r in rows] == [f"fix-{i}" for i in range(1, 6)]
    assert len({r["fanout"] for r in rows}) == 1

    # Each attempt ran in its own box with its own port and database role, and the documented env.
    envs = {i: json.loads(_seen(seen, home / "boxes" / by[i]["box"], i)) for i in range(1, 6)}
    for i, e in envs.items():
        assert e["box"] == e["WTBOX_ID"] == by[i]["box"]
        assert e["cwd"] == str(home / "boxes" / by[i]["box"] / "worktree")
        assert (e["WTBOX_FANOUT_INDEX"], e["WTBOX_FANOUT_N"]) == (str(i), "5")
    assert len({e["PORT"] for e in envs.values()}) == 5
    users = {e["DATABASE_URL"].split("//")[1].split(":")[0] for e in envs.values()}
    assert len(users) == 5 and all(u.startswith("wt_") for u in users)
    live_roles = {r[0] for r in pg_cluster.sql("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (list(users),))}
    assert live_roles == users

    # The rows show exactly the differences between the attempts.
    for i in (1, 2, 4):
        assert (by[i]["run_exit"], by[i]["tests_passed"], by[i]["tests_failed"], by[i]["checks_passed"]) == (0, 2, 0, 1)
    assert by[3]["run_exit"] == 0 and by[3]["tests_failed"] == 2 and by[3]["checks_passed"] == 0
    assert by[5]["run_exit"] == 3 and by[5]["tests_failed"] == 1  # the bug is still there
    assert max(rows, key=lambda r: r["p95_ms"])["index"] == 4
    assert by[4]["p95_ms"] >= 200  # 200 ms, not less: a fast server's p95 can spike on a busy 2-core host
    assert all(r["probes"]["/"]["answered"] == 40 and r["probes"]["/"]["recorded"] for r in rows)
    assert all(r["ready_seconds"] is not None and r["ready_seconds"] > 0 for r in rows)
    assert by[4]["diff_insertions"] == 2 and by[5]["diff_files"] == 1 and by[5]["diff_deletions"] == 0
    assert by[5]["log_errors"] >= 1 and by[1]["log_errors"] == 0
    # Whatever a run left is committed on its box branch: nothing is only in a worktree.
    for r in rows:
        assert r["commit"] and git(repo, "rev-parse", r["branch"]).strip() == r["commit"]
    assert git(repo, "show", f"{by[5]['commit']}:NOTES.md") == "half done\n"

    logs = run_wtbox("logs", by[5]["box"], "--service", "run").stdout
    assert "error: the agent crashed" in logs and "exited with code 3" in logs
    run_log = (home / "boxes" / by[1]["box"] / "logs" / "run.jsonl").read_text()
    password = envs[1]["DATABASE_URL"].split("//")[1].split(":")[1].split("@")[0]
    assert "attempt 1 applied with postgresql://" in run_log and password not in run_log

    ranked = json.loads(run_wtbox("compare", "--fanout", "fix", "--sort", "best", "--json").stdout)
    assert ranked[0]["index"] in (1, 2) and ranked[-1]["index"] == 5
    assert {r["box"] for r in ranked} == {r["box"] for r in rows}
    table = run_wtbox("compare", "--fanout", "fix").stdout
    assert table.splitlines()[0].split() == ["BOX", "STATE", "RUN", "TIME", "CHECKS", "PASSED", "FAILED", "DIFF",
                                             "READY", "P95", "ERRORS", "CONSOLE", "URL"]
    assert len(table.splitlines()) == 6

    best = ranked[0]
    others = [r for r in rows if r["box"] != best["box"]]
    out = json.loads(run_wtbox("pick", best["box"], "--yes", "--json").stdout)
    assert out["kept"] == best["box"] and sorted(out["removed"]) == sorted(r["box"] for r in others)
    assert sorted(out["kept_branches"]) == sorted(r["branch"] for r in others)  # each holds its attempt
    left = json.loads(run_wtbox("ls", "--json").stdout)
    assert [(b["id"], b["keep"]) for b in left] == [(best["box"], True)]

    from worktreebox.system import procs

    worktrees = git(repo, "worktree", "list")
    leases = host.registry.lease_owners()
    for r in others:
        assert not Path(r["dir"]).exists()
        assert r["box"] not in worktrees
        assert procs.find_box_processes(r["box"], r["dir"]) == []
        assert r["box"] not in leases
        assert git(repo, "rev-parse", r["branch"]).strip() == r["commit"]
    gone = [u for u in users if u != f"wt_{best['box'][-8:]}"]
    assert pg_cluster.sql("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (gone,)) == []


def test_fanout_that_cannot_fit_creates_nothing(home, host, make_repo, run_wtbox):
    (home / "config.toml").write_text(HOST_CONFIG + "max_boxes = 3\n")
    repo = make_repo(toml=CORE_TOML)
    host.new("already", repo=repo)
    proc = run_wtbox("fanout", "big", "-n", "3", "--repo", str(repo), "--run", "true", check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("wtbox: A fan-out of 3 boxes does not fit") and proc.stderr.count("\n") == 1
    assert [b.task for b in host.list()] == ["already"]
    assert "big" not in git(repo, "branch", "--list")
    assert sorted(p.name for p in (home / "boxes").iterdir()) == [host.list()[0].id]


def test_compare_any_boxes_json_and_sort(home, host, make_repo, run_wtbox):
    repo = make_repo({"a.txt": "one\n"}, toml=CORE_TOML)
    small, big = host.new("small", repo=repo), host.new("big", repo=repo)
    (small.path / "a.txt").write_text("two\n")
    (big.path / "a.txt").write_text("two\nthree\nfour\n")
    big.logs_dir.mkdir(parents=True, exist_ok=True)
    record = {"ts": "2026-01-01T00:00:00.000Z", "service": "web", "stream": "stderr", "level": "error", "msg": "boom"}
    (big.logs_dir / "web.jsonl").write_text(json.dumps(record) + "\n")

    rows = json.loads(run_wtbox("compare", big.id, small.id, "--json").stdout)
    assert [r["box"] for r in rows] == [big.id, small.id]
    assert (rows[0]["diff_insertions"], rows[0]["diff_deletions"], rows[0]["log_errors"]) == (3, 1, 1)
    assert (rows[1]["diff_insertions"], rows[1]["diff_deletions"], rows[1]["log_errors"]) == (1, 1, 0)
    assert rows[0]["run_exit"] is None and rows[0]["fanout"] is None
    by_diff = json.loads(run_wtbox("compare", big.id, small.id, "--sort", "diff", "--json").stdout)
    assert [r["box"] for r in by_diff] == [small.id, big.id]
    by_errors = json.loads(run_wtbox("compare", small.id, big.id, "--sort", "errors", "--json").stdout)
    assert [r["box"] for r in by_errors] == [small.id, big.id]
    plain = run_wtbox("compare", big.id, small.id).stdout.splitlines()
    assert plain[2].split()[0] == small.id and "1f +1 -1*" in plain[2]  # the best diff is starred

    bad = run_wtbox("compare", big.id, "--sort", "colour", check=False)
    assert bad.returncode == 2 and "Cannot sort by 'colour'" in bad.stderr
    both = run_wtbox("compare", big.id, "--fanout", "x", check=False)
    assert both.returncode == 2 and "either BOX" in both.stderr
    missing = run_wtbox("compare", "--fanout", "nothing", check=False)
    assert missing.returncode == 2 and "No fan-out named 'nothing'" in missing.stderr


def test_timeout_and_pick_needs_yes_without_a_terminal(home, host, make_repo, run_wtbox):
    repo = make_repo(toml=CORE_TOML)
    run = 'if [ "$WTBOX_FANOUT_INDEX" = 2 ]; then exec sleep 30; fi; echo {i} > attempt-{i}.txt'
    proc = run_wtbox("fanout", "try", "-n", "3", "--repo", str(repo), "--run", run, "--timeout", "1s", "--jobs", "2",
                     "--json", check=False)
    assert proc.returncode == 1 and "1 of 3 attempts failed" in proc.stderr  # the one that timed out
    rows = json.loads(proc.stdout)
    by = rows_by_index(rows)
    assert by[2]["run_exit"] == 124 and by[2]["timed_out"] and by[2]["commit"] is None
    assert by[1]["run_exit"] == 0 and by[1]["commit"] and by[3]["commit"]
    assert "timeout" in run_wtbox("compare", "--fanout", "try").stdout

    refused = run_wtbox("pick", by[1]["box"], input="", check=False)
    assert refused.returncode == 2 and "pass --yes" in refused.stderr
    assert len(host.list()) == 3

    # Uncommitted work of an attempt is saved on its branch before the box goes.
    (Path(by[3]["dir"]) / "worktree" / "later.txt").write_text("added after the run\n")
    origin = repo.parent / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    git(repo, "remote", "add", "origin", str(origin))
    out = json.loads(run_wtbox("pick", by[1]["box"], "--yes", "--merge-into", "main", "--push", "--json",
                               input="").stdout)
    assert out["merged_into"] == "main" and (repo / "attempt-1.txt").read_text() == "1\n"  # main is checked out there
    assert out["pushed"] == "origin/main" and git(origin, "rev-parse", "main") == git(repo, "rev-parse", "main")
    assert sorted(out["removed"]) == sorted([by[2]["box"], by[3]["box"]])
    assert out["kept_branches"] == [by[3]["branch"]]  # attempt 2 made no commit: its branch went with it
    assert git(repo, "show", f"{by[3]['branch']}:later.txt") == "added after the run\n"
    assert by[2]["branch"] not in git(repo, "branch", "--list")
    assert [b.id for b in host.list()] == [by[1]["box"]] and host.list()[0].keep


def test_ctrl_c_stops_every_run_and_leaves_the_boxes(home, host, make_repo, wtbox_home):
    repo = make_repo(toml=CORE_TOML)
    env = {**os.environ, "WTBOX_HOME": str(wtbox_home), "WTBOX_NO_AUTO_GC": "1"}
    p = subprocess.Popen([PY, "-m", "worktreebox.cli.main", "fanout", "stop", "-n", "2", "--repo", str(repo),
                          "--run", "sleep 60 & sleep 60"], env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            states = [(b.data.get("fanout") or {}).get("state") for b in host.list()]
            if states == ["running", "running"]:
                break
            time.sleep(0.05)
        assert states == ["running", "running"]
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    boxes = host.list()
    assert len(boxes) == 2 and all(b.data["fanout"]["state"] == "interrupted" for b in boxes)
    assert f"wtbox rm --force {boxes[0].id}" in err or f"wtbox rm --force {boxes[1].id}" in err

    for b in boxes:  # both sleeps of each run were ended with their process group
        assert box_runs(b.id, b.dir) == []
