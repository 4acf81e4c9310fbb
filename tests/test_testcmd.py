"""`wtbox test BOX`: the repo's [test] cmd run in the box (box env, worktree, cgroup), its exit code
passed through; `compare` shows its result; `fanout` runs it as the check when no --check is given."""
from __future__ import annotations

import json

BARE = '[database]\nmode = "none"\n[observability]\nenabled = false\n'
TEST = '[test]\ncmd = "echo box=$WTBOX_ID port={{ ports.web }}; test -f marker && echo \'2 passed in 0.01s\'"\n'


def test_wtbox_test_runs_the_test_command_in_the_box(host, make_repo, run_wtbox):
    repo = make_repo({"marker": "x"}, toml=BARE + TEST)
    box = host.new("t", repo)
    proc = run_wtbox("test", box.id)
    assert f"box={box.id} port={box.ports['web']}" in proc.stdout  # the box env; the command a template
    assert "2 passed" in proc.stdout and "exit 0" in proc.stderr
    doc = json.loads(run_wtbox("test", box.id, "--json").stdout)
    assert doc["exit"] == 0 and doc["passed"] == 2 and doc["id"] == box.id
    records = (box.logs_dir / "test.jsonl").read_text()
    assert "2 passed" in records  # its output is the box's `test` log
    (box.path / "marker").unlink()
    proc = run_wtbox("test", box.id, check=False)
    assert proc.returncode == 1  # the command's own exit code
    proc = run_wtbox("test", box.id, "--cmd", "exit 7", check=False)
    assert proc.returncode == 7
    rows = json.loads(run_wtbox("compare", box.id, "--json").stdout)
    assert rows[0]["checks_total"] == 1 and rows[0]["checks_passed"] == 0  # the last `wtbox test` (exit 7)


def test_without_a_test_command_it_says_where_to_get_one(host, make_repo, run_wtbox):
    box = host.new("t", make_repo(toml=BARE))
    proc = run_wtbox("test", box.id, check=False)
    assert proc.returncode == 2 and "[test] cmd" in proc.stderr and "wtbox init" in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_fanout_without_check_runs_the_test_command(make_repo, run_wtbox):
    repo = make_repo({"marker": "x"}, toml=BARE + TEST)
    rows = json.loads(run_wtbox("fanout", "try", "-n", "2", "--repo", str(repo), "--json", timeout=300).stdout)
    assert [(r["checks_passed"], r["checks_total"], r["tests_passed"]) for r in rows] == [(1, 1, 2), (1, 1, 2)]
    run_wtbox("rm", "--force", *(r["id"] for r in rows))
