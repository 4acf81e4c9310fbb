"""A box's fingerprint and `wtbox diff` (fleet/fingerprint.py, fleet/diff.py): real boxes with a dependency
layer (a recipe), database mode with a migration, against the session's PostgreSQL."""
from __future__ import annotations

import json

import pytest
from helpers import git

from worktreebox.fleet import diff as D
from worktreebox.fleet import fingerprint

TOML = """
[box]
ports = []
[deps.vendor]
cmd = "mkdir -p vendor && cp deps.lock vendor/"
paths = ["vendor"]
lock = ["deps.lock"]
[database]
migrate = "psql -q -v ON_ERROR_STOP=1 \\"$DATABASE_URL\\" -f migrations/001.sql"
migrations = ["migrations/**"]
[observability]
enabled = false
"""
MIGRATION = "CREATE TABLE items (x int); INSERT INTO items VALUES (1);\n"


@pytest.fixture
def repo(make_repo):
    return make_repo({"deps.lock": "lib==1\n", "migrations/001.sql": MIGRATION}, toml=TOML)


def commit(repo, path: str, text: str) -> None:
    (repo / path).write_text(text)
    git(repo, "commit", "-qam", f"change {path}")


def differ(host, a, b) -> set[str]:
    out = D.diff(host, a, b)
    return {p["part"] for p in out["fingerprint"]}


def test_same_inputs_same_fingerprint_and_an_empty_diff_then_each_change_named(host, repo, monkeypatch):
    monkeypatch.delenv("WTBOX_REPRO_VAR", raising=False)
    a = host.new("a", repo=repo)
    b = host.new("b", repo=repo)
    assert fingerprint.of(a) == fingerprint.of(b)
    parts = fingerprint.parts_of(a)
    assert parts["layers"] and parts["migrations"] and parts["config"] and parts["mounts"] and parts["wtbox"]
    out = D.diff(host, a, b)
    assert out["same"] and out == {**out, "fingerprint": [], "files": [], "data": []}

    # a lock file: a new layer (and so a new commit, and the file itself)
    commit(repo, "deps.lock", "lib==2\n")
    c = host.new("c", repo=repo)
    out = D.diff(host, a, c)
    assert differ(host, a, c) == {"commit", "layers"} and out["files"] == ["deps.lock"] and out["data"] == []
    host.rm(c, force=True)
    git(repo, "reset", "-q", "--hard", "HEAD~1")

    # the config (an uncommitted edit of the main checkout's wtbox.toml: the commit stays)
    (repo / "wtbox.toml").write_text(TOML + "\n# a comment changes the recorded text\n")
    c = host.new("c", repo=repo)
    assert differ(host, a, c) == {"config"} and D.diff(host, a, c)["files"] == []
    host.rm(c, force=True)
    git(repo, "checkout", "-q", "wtbox.toml")

    # an inherited variable ([box] inherit_env names it; wtbox.toml is committed so the commit moves:
    # compare with a box of that commit made without the variable)
    commit(repo, "wtbox.toml", TOML.replace("ports = []", 'ports = []\ninherit_env = ["WTBOX_REPRO_VAR"]'))
    without = host.new("without", repo=repo)
    monkeypatch.setenv("WTBOX_REPRO_VAR", "1")
    c = host.new("c", repo=repo)
    monkeypatch.delenv("WTBOX_REPRO_VAR")
    assert differ(host, without, c) == {"env"} and D.diff(host, without, c)["files"] == []
    for box in (c, without):
        host.rm(box, force=True)
    git(repo, "reset", "-q", "--hard", "HEAD~1")

    # a migration: its hash, the file, and the data it made
    commit(repo, "migrations/001.sql", MIGRATION + "INSERT INTO items VALUES (2);\n")
    c = host.new("c", repo=repo)
    out = D.diff(host, a, c)
    assert differ(host, a, c) == {"commit", "migrations"}
    assert out["files"] == ["migrations/001.sql"] and out["data"] == [{"table": "items", "a": 1, "b": 2}]


def test_a_boxs_own_changes_are_files_and_rows(host, repo):
    import psycopg

    a = host.new("a", repo=repo)
    b = host.new("b", repo=repo)
    (b.path / "notes.txt").write_text("mine\n")
    (b.path / "deps.lock").write_text("lib==3\n")
    with psycopg.connect(b.data["database"]["url"], autocommit=True) as conn:  # as the host reaches it
        conn.execute("INSERT INTO items VALUES (5), (6)")
    out = D.diff(host, a, b)
    assert not out["same"] and out["fingerprint"] == []
    assert out["files"] == ["deps.lock", "notes.txt"] and out["data"] == [{"table": "items", "a": 1, "b": 3}]
    text = "\n".join(D.lines(out))
    assert "notes.txt" in text and "items 1 vs 3 rows" in text


def test_status_ls_and_new_carry_the_fingerprint(repo, run_wtbox):
    new = json.loads(run_wtbox("new", "fp", "--json", cwd=repo).stdout)
    status = json.loads(run_wtbox("status", new["id"], "--json").stdout)
    assert new["fingerprint"] == status["fingerprint"] and set(status["fingerprint"]["parts"]) == set(fingerprint.PARTS)
    short = status["fingerprint"]["hash"]
    assert [b["fingerprint"] for b in json.loads(run_wtbox("ls", "--json").stdout)] == [short]
    assert short in run_wtbox("ls").stdout and short in run_wtbox("status", new["id"]).stdout
    assert new["pool"] == {"claimed": False, "why": "no ready pooled box of this commit and config"}
    diff = run_wtbox("diff", new["id"], new["id"])
    assert "are the same" in diff.stdout


def test_runtime_is_deterministic_by_default_and_the_config_overrides_it(host, make_repo, monkeypatch):
    from helpers import CORE_TOML

    monkeypatch.setenv("TZ", "Asia/Tokyo")
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")
    repo = make_repo(toml=CORE_TOML)
    a = host.new("a", repo=repo)
    env = host.exec_env(a)
    commit_time = int(git(repo, "show", "-s", "--format=%ct", "HEAD").strip())
    want = {"PYTHONHASHSEED": "0", "TZ": "UTC", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "SOURCE_DATE_EPOCH": str(commit_time)}
    assert {k: env[k] for k in want} == want
    (repo / "wtbox.toml").write_text(CORE_TOML + '[box]\nenv = { TZ = "Europe/Paris" }\ninherit_env = ["LC_ALL"]\n')
    b = host.new("b", repo=repo)
    env = host.exec_env(b)
    assert env["TZ"] == "Europe/Paris" and env["LC_ALL"] == "de_DE.UTF-8" and env["PYTHONHASHSEED"] == "0"


def test_an_inherited_urls_password_is_not_in_the_fingerprint(host, make_repo, monkeypatch):
    """A URL with a password is inherited like a --secret: the fingerprint names it among the
    secrets, never with its value."""
    from helpers import CORE_TOML

    monkeypatch.setenv("WTBOX_REPRO_PROXY", "http://user:hunter2@proxy.example:3128")
    repo = make_repo(toml=CORE_TOML + '[box]\ninherit_env = ["WTBOX_REPRO_PROXY"]\n')
    a = host.new("a", repo=repo)
    assert "hunter2" not in json.dumps(fingerprint.of(a))
    assert "WTBOX_REPRO_PROXY" not in fingerprint.of(a)["parts"]["env"]
    assert fingerprint.of(a)["parts"]["secrets"] == ["WTBOX_REPRO_PROXY"]
    # what a fresh box would get is compared in the same form: a pooled one is still claimable
    from worktreebox.config.recorded import config_of

    want = fingerprint.expected(host, str(repo), a.data["base_sha"], config_of(a.data))
    assert want["env"] == fingerprint.parts_of(a)["env"]
    assert want["secrets"] == fingerprint.parts_of(a)["secrets"]


def test_data_that_cannot_be_read_is_said_not_taken_as_the_same(host, repo):
    a = host.new("a", repo=repo)
    b = host.new("b", repo=repo)
    b.data["database"] = {**b.data["database"], "name": "wtbox_no_such_db"}  # its database is gone
    out = D.diff(host, a, b)
    assert not out["same"] and out["data"] == [] and "wtbox_no_such_db" in out["data_error"]
    assert any(line.startswith("data         not compared: ") for line in D.lines(out))
