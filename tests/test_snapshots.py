"""Snapshot, restore, fork and db reset of a running box, against the real things: a git repo, the
embedded PostgreSQL (database mode), a copy-on-write worktree, a service under the supervisor."""
from __future__ import annotations

import subprocess
import sys
import urllib.request

import psycopg
import pytest
from helpers import git

from worktreebox.box import hex_of
from worktreebox.errors import WtboxError
from worktreebox.fleet import fork as F
from worktreebox.fleet import restore as R
from worktreebox.fleet import snapshots as S
from worktreebox.system import cgroups

PY = sys.executable
SERVICE = '''
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(open("app.txt").read().encode())
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
'''
MIGRATE = "psql -q -v ON_ERROR_STOP=1 -c 'CREATE TABLE items (id serial PRIMARY KEY, note text)'"


def toml(mode: str = "database") -> str:
    return (f'[box]\nports = ["web"]\n[database]\nmode = "{mode}"\nmigrate = "{MIGRATE}"\n'
            '[observability]\nenabled = false\n'
            f'[services.web]\ncmd = "{PY} server.py"\nready = "tcp:{{{{ ports.web }}}}"\n')


def rows(box) -> list[str]:
    with psycopg.connect(box.data["database"]["url"], autocommit=True) as conn:
        return [r[0] for r in conn.execute("SELECT note FROM items ORDER BY id")]


def insert(box, note: str) -> None:
    with psycopg.connect(box.data["database"]["url"], autocommit=True) as conn:
        conn.execute("INSERT INTO items (note) VALUES (%s)", (note,))


def answer(box) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{box.ports['web']}/", timeout=5) as r:
        return r.read().decode()


def events(box) -> str:
    """The supervisor's start, ready and exit events and the service's processes now (a failed once
    under load, answering from the files before the restore, and this says which process answered)."""
    import json

    lines = []
    for f in sorted(box.logs_dir.glob("*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("event") in ("start", "ready", "exit", "restart"):
                lines.append(f"{rec['ts']} {rec.get('service')}: {rec['msg']}")
    ps = subprocess.run(["ps", "-o", "pid,pgid,lstart,args", "-C", "python3,python"], capture_output=True, text=True)
    return "\n".join([*sorted(lines), ps.stdout])


def copies_of(pg, box) -> list[str]:
    return [r[0] for r in pg.sql("SELECT datname FROM pg_database WHERE datname LIKE %s",
                                 (f"wt\\_{hex_of(box.id)}\\_%",))]


@pytest.fixture
def app(make_repo):
    return make_repo({"server.py": SERVICE, "app.txt": "v0\n"}, toml=toml())


def test_edits_and_rows_travel_to_forks_and_back_with_restore_and_reset(pg_host, pg_cluster, app):
    host = pg_host
    a = host.new("orig", repo=app)
    (a.path / "app.txt").write_text("edited\n")
    git(a.path, "add", "app.txt")
    git(a.path, "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qm", "edit")
    tip = git(a.path, "rev-parse", "HEAD").strip()
    (a.path / "notes.txt").write_text("uncommitted\n")
    insert(a, "row-1")

    snap = S.take(host, a, "s1")
    assert snap.meta["tip"] == tip and snap.meta["services"] == ["web"]
    assert snap.meta["files_bytes"] < 200_000  # the box's changes, not the tree
    assert snap.database in copies_of(pg_cluster, a)
    assert answer(a) == "edited\n"  # the service ran on through the snapshot

    # later changes in A
    (a.path / "app.txt").write_text("later\n")
    (a.path / "extra.txt").write_text("x\n")
    insert(a, "row-2")

    f1, f2 = F.fork(host, a, 2, "try")
    for f in (f1, f2):
        assert f.id.startswith("try-") and f.branch == f"wtbox/{f.id}"
        assert f.data["database"]["name"] == f.pg_name == f"wt_{hex_of(f.id)}"
        assert f.env["PGUSER"] == f.pg_name and f.ports["web"] not in (a.ports["web"],)
        assert (f.path / "app.txt").read_text() == "later\n" and (f.path / "extra.txt").exists()
        assert (f.path / "notes.txt").read_text() == "uncommitted\n"
        assert rows(f) == ["row-1", "row-2"]
        assert git(f.path, "rev-parse", "HEAD").strip() == tip  # branch starts at A's tip
        assert "notes.txt" in git(f.path, "status", "--porcelain")
        assert answer(f) == "later\n"  # its service reads its own view
        backend = cgroups.for_home(host.home)
        if backend is not None:
            assert backend.exists(f.id) and backend.pids(f.id)
    assert len({f1.ports["web"], f2.ports["web"]}) == 2
    assert not [s for s in S.listed(a) if s.name != "s1"]  # the fork's own snapshot is gone

    # independent afterwards
    (f1.path / "app.txt").write_text("f1\n")
    insert(f1, "f1-row")
    assert (a.path / "app.txt").read_text() == "later\n" and (f2.path / "app.txt").read_text() == "later\n"
    assert rows(a) == ["row-1", "row-2"] and rows(f2) == ["row-1", "row-2"]
    insert(a, "a-row")
    assert "a-row" not in rows(f1) + rows(f2)

    out = R.restore(host, a, "s1")
    a = host.get(a.id)
    assert a.state == "ready" and out["files_restored"] and out["services_restarted"]
    assert (a.path / "app.txt").read_text() == "edited\n" and not (a.path / "extra.txt").exists()
    assert (a.path / "notes.txt").read_text() == "uncommitted\n"
    assert rows(a) == ["row-1"]
    assert answer(a) == "edited\n", events(a)  # restarted on the snapshot's files
    assert git(a.path, "rev-parse", "HEAD").strip() == tip

    # a data-only restore leaves the running service alone
    insert(a, "row-again")
    pid = host.describe(a)["services"][0]["pid"]
    out = R.restore(host, a, "s1")
    assert not out["files_restored"] and rows(a) == ["row-1"]
    assert host.describe(host.get(a.id))["services"][0]["pid"] == pid

    reset = R.db_reset(host, host.get(a.id))
    assert rows(a) == [] and (a.path / "app.txt").read_text() == "edited\n"
    assert reset["paused_ms"] < 1000

    [g] = F.fork(host, host.get(a.id), 1, "from-snap", from_snapshot="s1")
    assert rows(g) == ["row-1"] and (g.path / "app.txt").read_text() == "edited\n"
    assert g.data["fork"] == {"from": a.id, "snapshot": "s1", "tip": tip}

    for f in (f1, f2, g):
        host.rm(f.id, force=True)
    host.rm(a.id, force=True)
    assert copies_of(pg_cluster, a) == []


def test_snapshot_list_rm_and_refusals(pg_host, pg_cluster, app, make_repo):
    host = pg_host
    a = host.new("lst", repo=app, start_services=False)
    s1 = S.take(host, a)
    s2 = S.take(host, a)
    assert [s.name for s in S.shown(a)] == [s1.name, s2.name] == ["snap-1", "snap-2"]
    with pytest.raises(WtboxError, match="already has a snapshot"):
        S.take(host, a, "snap-1")
    with pytest.raises(WtboxError, match="not usable"):
        S.take(host, a, "../x")
    import dataclasses

    insert(a, "gone after reset")
    host._config = dataclasses.replace(host.config, database_spares=0)  # the copy path, no spare to take
    try:
        out = R.db_reset(host, a)
    finally:
        host._config = None
    assert out["spare"] is False and rows(a) == []
    S.remove(host, a, "snap-1")
    assert [s.name for s in S.shown(a)] == ["snap-2"] and len([c for c in copies_of(pg_cluster, a) if "_s_" in c]) == 1
    with pytest.raises(WtboxError, match="has no snapshot 'snap-1'"):
        R.restore(host, a, "snap-1")
    host.rm(a.id, force=True)
    assert copies_of(pg_cluster, a) == []

    schema = host.new("sch", repo=make_repo({"app.txt": "x"}, toml=toml("schema").split("[services")[0]))
    with pytest.raises(WtboxError, match="mode = \"database\""):
        S.take(host, schema)
    with pytest.raises(WtboxError, match="mode = \"database\""):
        F.fork(host, schema)
    host.rm(schema.id, force=True)


def test_cli_json_snapshot_fork_reset_dump(pg_cluster, app, tmp_path):
    import json
    import os

    env = {**os.environ, "WTBOX_HOME": str(pg_cluster.home), "WTBOX_NO_AUTO_GC": "1"}
    env.pop("WTBOX_POSTGRES_URL", None)

    def wtbox(*args: str) -> dict:
        p = subprocess.run([PY, "-m", "worktreebox.cli.main", *args], capture_output=True, text=True, env=env,
                           timeout=120)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout) if "--json" in args else {}

    box = wtbox("new", "cli", "--repo", str(app), "--json")
    try:
        snap = wtbox("snapshot", box["id"], "first", "--json")
        assert snap["name"] == "first" and snap["paused_ms"] >= 0
        assert wtbox("snapshot", box["id"], "--list", "--json")["snapshots"][0]["name"] == "first"
        forks = wtbox("fork", box["id"], "-n", "1", "--json")
        assert forks[0]["fork"]["from"] == box["id"]
        wtbox("rm", "--force", forks[0]["id"])
        assert wtbox("db", "reset", box["id"], "--json")["mode"] == "database"
        dump = wtbox("db", "dump", box["id"], str(tmp_path / "d.sql"), "--json")
        assert "CREATE TABLE public.items" in (tmp_path / "d.sql").read_text() and dump["bytes"] > 0
        out = wtbox("restore", box["id"], "first", "--json")
        assert out["snapshot"] == "first"
        bad = subprocess.run([PY, "-m", "worktreebox.cli.main", "restore", box["id"], "nope"], capture_output=True,
                             text=True, env=env)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    finally:
        subprocess.run([PY, "-m", "worktreebox.cli.main", "rm", "--force", box["id"]], env=env, capture_output=True)


def test_fanout_from_a_box_runs_every_attempt_from_its_state(pg_host, pg_cluster, app):
    from worktreebox.operations import fleet

    host = pg_host
    a = host.new("mid", repo=app)
    (a.path / "app.txt").write_text("midpoint\n")
    insert(a, "seed")
    rows_out = fleet.fanout(host, "five", 2, ref=a.id, run="cat app.txt && psql -Atc 'SELECT note FROM items'")
    try:
        assert [r["run_exit"] for r in rows_out] == [0, 0]
        for r in rows_out:
            b = host.get(r["id"])
            assert b.data["fanout"]["result"]["run"]["last_lines"][-2:] == ["midpoint", "seed"]
            assert b.data["fanout"]["from_box"] == a.id and rows(b) == ["seed"]
        assert not S.listed(a)  # the fan-out's snapshot went away
    finally:
        for r in rows_out:
            if r["id"]:
                host.rm(r["id"], force=True)
        host.rm(a.id, force=True)


def test_gc_removes_what_a_killed_operation_left_and_thaws_the_box(pg_host, pg_cluster, app):
    import json
    import os

    from worktreebox.fleet import gc
    from worktreebox.providers.postgres import boxcopy

    host = pg_host
    a = host.new("gcd", repo=app)
    keep = S.take(host, a, "kept")
    # what a snapshot killed while the box was frozen leaves: a scratch dir naming a dead owner, a copy
    dead = subprocess.Popen(["true"])
    dead.wait()
    scratch = S.root(a) / ".tmp-dead01"
    scratch.mkdir()
    stray = boxcopy.copy_name(a.pg_name, boxcopy.SNAPSHOT)
    half = boxcopy.copy_name(a.pg_name, boxcopy.INCOMING)
    (scratch / S.OP).write_text(json.dumps({"owner": [dead.pid, 1], "databases": [stray]}))
    srv = S.server_of(host, a)
    with srv.session(srv.shared_db) as conn:
        boxcopy.copy_database(conn, a.data["database"]["name"], stray)
        boxcopy.copy_database(conn, a.data["database"]["name"], half)
    backend = cgroups.for_home(host.home)
    if backend is not None:
        assert backend.freeze(a.id, True)
        assert backend.frozen(a.id)
    out = gc.run(host, grace=0)
    assert stray in out["snapshots"] and half in out["snapshots"] and str(scratch) in out["snapshots"]
    assert sorted(copies_of(pg_cluster, a)) == [keep.database]
    assert not scratch.exists() and [s.name for s in S.shown(a)] == ["kept"]
    if backend is not None:
        assert not backend.frozen(a.id) and answer(a) == "v0\n"
    assert os.path.isdir(a.path)
    host.rm(a.id, force=True)


def test_fork_of_a_box_with_data_only_changes_takes_a_pooled_box(pg_host, pg_cluster, app):
    """The files are the commit's: a pooled box (services up) gets the snapshot's data; a box with edited
    files is never served from the pool (its pooled services would run the pristine files)."""
    from worktreebox.fleet import pool as P

    host = pg_host
    a = host.new("datamid", repo=app)
    insert(a, "seeded")
    host.registry.set_pool_size(str(app), 1)
    try:
        P.top_up(host, P.resolve_target(app), 1)
        [pooled] = P.pool_boxes(host, str(app))
        pid = host.describe(pooled)["services"][0]["pid"]
        [f] = F.fork(host, a, 1, "quick")
        assert f.data.get("pool_id") == pooled.id and f.id == f"quick-{hex_of(pooled.id)}"
        assert f.branch == f"wtbox/{f.id}" and f.data["database"]["name"] == f"wt_{hex_of(f.id)}"
        assert rows(f) == ["seeded"] and answer(f) == "v0\n"
        assert host.describe(f)["services"][0]["pid"] == pid  # its services were up already
        insert(f, "fork-only")
        assert rows(a) == ["seeded"]

        (a.path / "app.txt").write_text("changed\n")
        P.top_up(host, P.resolve_target(app), 1)
        [g] = F.fork(host, a, 1, "slow")
        assert not g.data.get("pool_id") and answer(g) == "changed\n" and rows(g) == ["seeded"]
    finally:
        P.drain(host, str(app))
        for b in host.list():
            host.rm(b.id, force=True)


def test_mcp_tools_snapshot_fork_reset_dump_restore(pg_cluster, app, tmp_path, monkeypatch):
    """The same through `wtbox mcp` (the tools come from the operations' declarations): results are
    structured, a bad snapshot name is one sentence and the server answers the next call."""
    from pathlib import Path

    import anyio
    from mcp_helpers import failed, ok, stdio_client

    monkeypatch.delenv("WTBOX_POSTGRES_URL", raising=False)  # the cluster's own home, as pg_host

    async def main():
        async with stdio_client(pg_cluster.home) as client:
            box = ok(await client.call_tool("box_new", {"task": "mcp-state", "repo": str(app)}))
            bid = box["id"]
            try:
                (Path(box["path"]) / "app.txt").write_text("mcp\n")
                snap = ok(await client.call_tool("box_snapshot", {"box": bid, "name": "m1"}))
                assert snap["name"] == "m1" and snap["paused_ms"] >= 0 and snap["files_bytes"] > 0
                [fork] = ok(await client.call_tool("box_fork", {"box": bid, "task": "mcp-fork"}))
                assert fork["fork"]["from"] == bid and fork["state"] == "ready"
                assert (Path(fork["path"]) / "app.txt").read_text() == "mcp\n"
                ok(await client.call_tool("box_rm", {"box": fork["id"], "force": True}))
                assert ok(await client.call_tool("db_reset", {"box": bid}))["mode"] == "database"
                dump = ok(await client.call_tool("db_dump", {"box": bid, "file": str(tmp_path / "d.sql")}))
                assert dump["bytes"] > 0 and "CREATE TABLE public.items" in (tmp_path / "d.sql").read_text()
                (Path(box["path"]) / "app.txt").write_text("later\n")
                assert ok(await client.call_tool("box_restore", {"box": bid, "name": "m1"}))["files_restored"]
                assert (Path(box["path"]) / "app.txt").read_text() == "mcp\n"
                assert "no snapshot 'nope'" in failed(await client.call_tool("box_restore", {"box": bid,
                                                                                            "name": "nope"}))
                assert ok(await client.call_tool("box_snapshot", {"box": bid, "list_": True}))["snapshots"]
            finally:
                await client.call_tool("box_rm", {"box": bid, "force": True})

    anyio.run(main)


def test_a_restore_reaches_the_box_however_slow_its_holder_was_made(pg_host, app, monkeypatch):
    """The holder and the worktree's view are made in parallel. When the view was mounted first, the
    holder bound that one view, and a restore's new view never reached the box: its restarted service
    read the old files (a CI run failed so). A slow holder made that order every time."""
    import time

    from worktreebox.resources import sandbox

    real = sandbox.make_holder

    def slow(host, box, config, started=None):
        time.sleep(0.5)  # the checkout and its view are done well before
        return real(host, box, config, started)

    monkeypatch.setattr(sandbox, "make_holder", slow)
    host = pg_host
    a = host.new("slow-holder", repo=app)
    (a.path / "app.txt").write_text("edited\n")
    S.take(host, a, "s1")
    (a.path / "app.txt").write_text("later\n")
    assert answer(a) == "later\n"
    R.restore(host, a, "s1")
    assert answer(host.get(a.id)) == "edited\n", events(a)
