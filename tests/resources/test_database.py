"""The database resource against a real PostgreSQL (one embedded cluster per session, see pg_fixtures)."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from helpers import APPS, wait_for

from worktreebox.box import hex_of
from worktreebox.errors import WtboxError

PY = sys.executable
NO_OBS = "\n[observability]\nenabled = false\n"


def toml(db: str = "", box: str = "") -> str:
    return f"[box]\nports = []\n{box}\n[database]\n{db}\n" + NO_OBS


def host_url(box) -> str:
    """The box's database as the host reaches it (its env names 127.0.0.1:5432, the forward inside a
    sandboxed box: see test_sandbox_agent.py for the box's side)."""
    return box.data["database"]["url"]


def connect(box, **kw) -> psycopg.Connection:
    return psycopg.connect(host_url(box), autocommit=True, **kw)


def leftovers(pg, box_id: str) -> dict[str, list]:
    name = f"wt_{hex_of(box_id)}"
    return {
        "roles": pg.sql("SELECT rolname FROM pg_roles WHERE rolname = %s", (name,)),
        "schemas": pg.sql("SELECT nspname FROM pg_namespace WHERE nspname = %s", (name,)),
        "databases": pg.sql("SELECT datname FROM pg_database WHERE datname = %s OR datname LIKE %s",
                            (name, f"%{name}%")),
    }


NOTHING = {"roles": [], "schemas": [], "databases": []}
SCHEMA = 'mode = "schema"'


# ------------------------------------------------------------------ schema mode

def test_two_boxes_are_isolated(pg_host, pg_cluster, make_repo):
    repo = make_repo(toml=toml(SCHEMA))
    a = pg_host.new("a", repo=repo)
    b = pg_host.new("b", repo=repo)
    assert a.data["database"]["mode"] == "schema"
    assert a.env["PGHOST"] == "127.0.0.1" and a.env["PGPORT"] in ("5432", str(pg_cluster.port))  # sandboxed or not
    assert a.env["DATABASE_URL"].startswith(f"postgresql://wt_{hex_of(a.id)}:")
    assert host_url(a).startswith(f"postgresql://wt_{hex_of(a.id)}:") and f":{pg_cluster.port}/" in host_url(a)
    with connect(a) as ca, connect(b) as cb:
        for conn, rows in ((ca, ["apple", "avocado"]), (cb, ["banana"])):
            conn.execute("CREATE TABLE items (name text)")  # unqualified: lands in the box's own schema
            for r in rows:
                conn.execute("INSERT INTO items VALUES (%s)", (r,))
        assert [r[0] for r in ca.execute("SELECT name FROM items ORDER BY 1")] == ["apple", "avocado"]
        assert [r[0] for r in cb.execute("SELECT name FROM items ORDER BY 1")] == ["banana"]
        assert ca.execute("SELECT current_schema()").fetchone()[0] == f"wt_{hex_of(a.id)}"

        b_schema = b.data["database"]["schema"]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            ca.execute(f'SELECT * FROM "{b_schema}".items')
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            ca.execute(f'INSERT INTO "{b_schema}".items VALUES (\'x\')')
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            ca.execute("CREATE TABLE public.sneaky (x int)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            ca.execute(f'CREATE TABLE "{b_schema}".sneaky (x int)')
        # information_schema lists only what A may use
        listed = ca.execute("SELECT table_schema FROM information_schema.tables WHERE table_name = 'items'").fetchall()
        assert listed == [(a.data["database"]["schema"],)]
        b_pid = cb.execute("SELECT pg_backend_pid()").fetchone()[0]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            ca.execute("SELECT pg_terminate_backend(%s)", (b_pid,))
        assert cb.execute("SELECT count(*) FROM items").fetchone()[0] == 1  # B's session survived


@pytest.mark.parametrize("mode", ["database", "schema"])
def test_rm_leaves_no_role_schema_or_database(pg_host, pg_cluster, make_repo, mode):
    repo = make_repo(toml=toml(f'mode = "{mode}"'))
    box = pg_host.new("gone", repo=repo)
    assert leftovers(pg_cluster, box.id) != NOTHING
    held = connect(box)  # rm must terminate sessions the box still holds
    held.execute("CREATE TABLE t (x int)")
    held.execute("BEGIN")
    held.execute("LOCK TABLE t")
    pg_host.rm(box.id, force=True)
    assert leftovers(pg_cluster, box.id) == NOTHING
    assert held.broken or held.closed or _dead(held)
    held.close()
    # destroy is idempotent
    pg_host.resource("database").destroy(pg_host, box)


def _dead(conn) -> bool:
    try:
        conn.execute("SELECT 1")
        return False
    except psycopg.OperationalError:
        return True


def test_extension_listed_can_be_created_by_the_box(pg_host, make_repo, tmp_path):
    mig = ('import os, psycopg\n'
           'c = psycopg.connect(os.environ["DATABASE_URL"], autocommit=True)\n'
           'c.execute(\'CREATE EXTENSION IF NOT EXISTS "uuid-ossp"\')\n'
           'c.execute("CREATE TABLE things (id uuid PRIMARY KEY DEFAULT uuid_generate_v4(), n int)")\n'
           'c.execute("INSERT INTO things (n) VALUES (1)")\n'
           'print("migrated with", os.environ["DATABASE_URL"])\n')
    repo = make_repo({"migrate.py": mig},
                     toml=toml(f'extensions = ["uuid-ossp"]\nmigrate = "{PY} migrate.py"'))
    with pg_host.new("ext", repo=repo) as box:
        with connect(box) as conn:
            (uid,) = conn.execute("SELECT id FROM things").fetchone()
            assert len(str(uid)) == 36
        log = (box.logs_dir / "migrate.jsonl").read_text()
        records = [json.loads(line) for line in log.splitlines()]
        assert any("migrated with" in r["msg"] for r in records)
        assert box.data["database"]["password"] not in log  # redacted
        assert "***" in log


def test_failed_migration_rolls_back_with_last_lines(pg_host, pg_cluster, make_repo):
    mig = ('import os, psycopg\n'
           'c = psycopg.connect(os.environ["DATABASE_URL"], autocommit=True)\n'
           'print("step one")\n'
           'c.execute(\'CREATE EXTENSION IF NOT EXISTS "pg_trgm"\')\n')  # not listed: the box may not create it
    repo = make_repo({"migrate.py": mig}, toml=toml(f'{SCHEMA}\nmigrate = "{PY} migrate.py"'))
    before = {r[0] for r in pg_cluster.sql("SELECT rolname FROM pg_roles WHERE rolname ~ '^wt_[0-9a-f]{8}$'")}
    with pytest.raises(WtboxError) as err:
        pg_host.new("badmig", repo=repo)
    msg = str(err.value)
    assert "exit code 1" in msg and "step one" in msg and "permission denied" in msg
    after = {r[0] for r in pg_cluster.sql("SELECT rolname FROM pg_roles WHERE rolname ~ '^wt_[0-9a-f]{8}$'")}
    assert after == before
    assert pg_host.list() == []


def test_database_mode_is_the_default_and_boxes_cannot_reach_each_other(pg_host, pg_cluster, make_repo):
    """The isolation schema mode has, for the default: no other box's data, no CREATE in shared places."""
    repo = make_repo(toml=toml())
    a = pg_host.new("a", repo=repo)
    b = pg_host.new("b", repo=repo)
    assert a.data["database"]["mode"] == "database" and a.env["PGDATABASE"] == f"wt_{hex_of(a.id)}"
    base = host_url(a).rsplit("/", 1)[0]
    with connect(a) as ca, connect(b) as cb:
        ca.execute("CREATE TABLE items (name text)")
        ca.execute("INSERT INTO items VALUES ('apple')")
        cb.execute("CREATE TABLE items (name text)")
        assert cb.execute("SELECT count(*) FROM items").fetchone()[0] == 0
        # A may not open a session on B's database, nor create anything in the server's shared ones
        with pytest.raises(psycopg.OperationalError, match="permission denied"):
            psycopg.connect(f"{base}/{b.env['PGDATABASE']}").close()
        for shared in ("postgres", "wtbox", "template1"):
            try:
                conn = psycopg.connect(f"{base}/{shared}", autocommit=True)
            except psycopg.OperationalError:
                continue  # not even a session
            with conn:
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute("CREATE TABLE public.sneaky (x int)")
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute("CREATE SCHEMA sneaky")
        b_pid = cb.execute("SELECT pg_backend_pid()").fetchone()[0]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            ca.execute("SELECT pg_terminate_backend(%s)", (b_pid,))
        assert cb.execute("SELECT count(*) FROM items").fetchone()[0] == 0
    for box in (a, b):
        pg_host.rm(box.id, force=True)
        assert leftovers(pg_cluster, box.id) == NOTHING


DJANGO_STYLE_RUNNER = """
import os, psycopg
# Django's test runner: connect to the 'postgres' database, CREATE DATABASE test_<NAME>, run the
# tests there, DROP it (pytest-django and Rails' db:test:prepare do the same).
base = os.environ["DATABASE_URL"].rsplit("/", 1)[0]
name = "test_" + os.environ["PGDATABASE"]
with psycopg.connect(base + "/postgres", autocommit=True) as nodb:
    nodb.execute(f'CREATE DATABASE "{name}"')
with psycopg.connect(base + "/" + name, autocommit=True) as t:
    t.execute("CREATE TABLE things (n int)")
    t.execute("INSERT INTO things VALUES (1), (2)")
    assert t.execute("SELECT sum(n) FROM things").fetchone()[0] == 3
if os.environ.get("KEEP") != "1":
    with psycopg.connect(base + "/postgres", autocommit=True) as nodb:
        nodb.execute(f'DROP DATABASE "{name}"')
print("ran in", name)
"""


def test_a_django_style_test_runner_creates_and_drops_its_test_database(pg_host, pg_cluster, make_repo, run_wtbox):
    repo = make_repo({"runtests.py": DJANGO_STYLE_RUNNER}, toml=toml())  # the default config
    env = {"WTBOX_HOME": str(pg_cluster.home), "WTBOX_POSTGRES_URL": ""}
    a = json.loads(run_wtbox("new", "dj-a", "--repo", str(repo), "--json", env=env).stdout)
    b = json.loads(run_wtbox("new", "dj-b", "--repo", str(repo), "--json", env=env).stdout)
    try:
        for box in (a, b):  # both at once would collide on one shared database; each has its own name
            proc = run_wtbox("exec", box["id"], "--", PY, "runtests.py", env=env)
            assert f"ran in test_wt_{hex_of(box['id'])}" in proc.stdout
        assert pg_cluster.sql("SELECT datname FROM pg_database WHERE datname LIKE 'test\\_wt\\_%%'") == []
        # a test database left behind is the box's: B cannot read it, and rm drops it
        run_wtbox("exec", a["id"], "--", PY, "runtests.py", env={**env, "KEEP": "1"})
        left = f"test_wt_{hex_of(a['id'])}"
        b_base = json.loads(run_wtbox("status", b["id"], "--json", "--show-secrets", env=env).stdout
                            )["database"]["url"].rsplit("/", 1)[0]
        try:
            conn = psycopg.connect(f"{b_base}/{left}", autocommit=True)
        except psycopg.OperationalError:
            conn = None
        if conn is not None:  # PostgreSQL lets anyone open a session on a new database; never read its data
            with conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT * FROM things")
    finally:
        run_wtbox("rm", "--force", a["id"], b["id"], env=env)
    assert pg_cluster.sql("SELECT datname FROM pg_database WHERE datname LIKE 'test\\_wt\\_%%'") == []
    assert leftovers(pg_cluster, a["id"]) == NOTHING and leftovers(pg_cluster, b["id"]) == NOTHING


def _spares(pg, key: str) -> list[str]:
    return [r[0] for r in pg.sql("SELECT datname FROM pg_database WHERE datname LIKE %s", (f"wt_spare_{key}_%",))]


def test_boxes_take_spare_databases_made_ahead(pg_host, pg_cluster, make_repo):
    """After a box, spares are made in the background; the next box renames one (no file copy), and it is
    as private as one made for it. Spares of a golden copy go when the golden copy goes stale."""
    from helpers import git, wait_for

    repo = make_repo({"migrate.py": MIGRATE_DB, "migrations/001.sql": "CREATE TABLE t (x int);"},
                     toml=toml(f'migrate = "{PY} migrate.py"'))
    first = pg_host.new("first", repo=repo)
    golden = goldens_of(pg_cluster, repo)[0]
    key = golden.removeprefix("wt_golden_")
    assert first.data["database"]["spare"] is False
    assert wait_for(lambda: len(_spares(pg_cluster, key)) >= 3, timeout=60) and len(_spares(pg_cluster, key)) == 3
    second = pg_host.new("second", repo=repo)
    assert second.data["database"]["spare"] is True
    with connect(second) as conn:
        assert conn.execute("SELECT count(*) FROM migration_runs").fetchone()[0] == 1  # the migrated state
        assert conn.execute("SELECT tableowner FROM pg_tables WHERE tablename = 't'").fetchone()[0] == \
            second.data["database"]["user"]
        conn.execute("CREATE TABLE mine (x int)")
    owner, acl = pg_cluster.sql("SELECT datdba::regrole::text, datacl::text FROM pg_database WHERE datname = %s",
                                (second.env["PGDATABASE"],))[0]
    assert owner == second.data["database"]["user"] and "=CTc/" in acl and not acl.startswith("{=")
    other = host_url(first).rsplit("/", 1)[0] + "/" + second.env["PGDATABASE"]
    with pytest.raises(psycopg.OperationalError, match="permission denied"):
        psycopg.connect(other).close()
    # a new migration: a new golden copy, and the old one's spares go with it
    (repo / "migrations" / "002.sql").write_text("CREATE TABLE t2 (x int);")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "002")
    third = pg_host.new("third", repo=repo)
    assert _spares(pg_cluster, key) == [] and goldens_of(pg_cluster, repo) != [golden]
    for box in (first, second, third):
        pg_host.rm(box.id, force=True)
        assert leftovers(pg_cluster, box.id) == NOTHING


def test_mode_none_touches_nothing(host, make_repo):
    repo = make_repo(toml=toml('mode = "none"'))
    with host.new("nodb", repo=repo) as box:
        assert "database" not in box.data and "DATABASE_URL" not in box.env


# ------------------------------------------------------------------ database mode

MIGRATE_DB = '''import os, pathlib, psycopg
c = psycopg.connect(os.environ["DATABASE_URL"], autocommit=True)
c.execute("CREATE TABLE IF NOT EXISTS migration_runs (at timestamptz DEFAULT clock_timestamp())")
c.execute("INSERT INTO migration_runs DEFAULT VALUES")
for f in sorted(pathlib.Path("migrations").glob("*.sql")):
    c.execute(f.read_text())
print("applied", os.environ["PGDATABASE"])
'''
TABLES_30 = "\n".join(f"CREATE TABLE t{i} (id serial PRIMARY KEY, name text, created timestamptz DEFAULT now());"
                      for i in range(30)) + "\nINSERT INTO t0 (name) VALUES ('seed');\n"


def goldens_of(pg, repo) -> list[str]:
    """The golden databases a repo's boxes are cloned from (the session cluster holds other tests' too)."""
    return [r[0] for r in pg.sql("SELECT datname FROM pg_database WHERE datname LIKE 'wt_golden_%%'"
                                 " AND shobj_description(oid, 'pg_database')::json->>'repo' = %s", (str(repo),))]


def test_database_mode_clones_golden_and_rebuilds_on_change(pg_host, pg_cluster, make_repo):
    from helpers import git

    repo = make_repo({"migrate.py": MIGRATE_DB, "migrations/001.sql": TABLES_30},
                     toml=toml(f'mode = "database"\nmigrate = "{PY} migrate.py"'))
    a = pg_host.new("dba", repo=repo)
    b = pg_host.new("dbb", repo=repo)
    ga = a.data["database"]
    assert ga["name"] == f"wt_{hex_of(a.id)}" and a.env["PGDATABASE"] == ga["name"]
    goldens = goldens_of(pg_cluster, repo)
    assert len(goldens) == 1 and not goldens[0].endswith(("_build", "_probe"))
    with connect(a) as ca, connect(b) as cb:
        # both are clones of one migration run
        (ra,) = ca.execute("SELECT at FROM migration_runs").fetchall()
        (rb,) = cb.execute("SELECT at FROM migration_runs").fetchall()
        assert ra == rb
        assert ca.execute("SELECT count(*) FROM information_schema.tables WHERE table_name ~ '^t[0-9]+$'"
                          ).fetchone()[0] == 30
        # the box owns what the migration made, and is alone in its database
        ca.execute("INSERT INTO t0 (name) VALUES ('only in a')")
        ca.execute("ALTER TABLE t1 ADD COLUMN extra int")
        assert cb.execute("SELECT count(*) FROM t0").fetchone()[0] == 1
        assert ca.execute("SELECT tableowner FROM pg_tables WHERE tablename = 't0'").fetchone()[0] == ga["user"]
    other = host_url(a).rsplit("/", 1)[0] + "/" + b.data["database"]["name"]
    with pytest.raises(psycopg.OperationalError, match="permission denied"):
        psycopg.connect(other).close()
    golden_url = host_url(a).rsplit("/", 1)[0] + "/" + goldens[0]
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(golden_url).close()

    # removing a clone leaves the golden alone
    pg_host.rm(a.id, force=True)
    assert leftovers(pg_cluster, a.id) == NOTHING
    assert goldens_of(pg_cluster, repo) == goldens

    # a new migration file: the next box gets a freshly built golden, the old one is dropped
    (repo / "migrations" / "002.sql").write_text("CREATE TABLE added_later (x int);")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "002")
    c = pg_host.new("dbc", repo=repo)
    with connect(c) as cc:
        cc.execute("SELECT * FROM added_later")
        assert len(cc.execute("SELECT at FROM migration_runs").fetchall()) == 1
    goldens2 = goldens_of(pg_cluster, repo)
    assert len(goldens2) == 1 and goldens2 != goldens
    for box in (b, c):
        pg_host.rm(box.id, force=True)
        assert leftovers(pg_cluster, box.id) == NOTHING


def test_database_mode_golden_is_built_once_for_parallel_boxes(pg_host, make_repo):
    repo = make_repo({"migrate.py": MIGRATE_DB + "import time; time.sleep(0.3)\n",
                      "migrations/001.sql": "CREATE TABLE x (i int);"},
                     toml=toml(f'mode = "database"\nmigrate = "{PY} migrate.py"'))
    from worktreebox.host import Host

    # one Host per thread, like separate `wtbox new` processes
    with ThreadPoolExecutor(4) as pool:
        boxes = list(pool.map(lambda i: Host(pg_host.home).new(f"par{i}", repo=repo), range(4)))
    runs = set()
    for box in boxes:
        with connect(box) as conn:
            runs.update(r[0] for r in conn.execute("SELECT at FROM migration_runs"))
    assert len(runs) == 1


# ------------------------------------------------------------------ host cluster

def test_discover_and_destroy_orphans(pg_host, pg_cluster, make_repo):
    repo = make_repo(toml=toml())
    box = pg_host.new("orphan", repo=repo)
    db = pg_host.resource("database")
    assert box.id in db.discover(pg_host)
    pg_host.registry.delete_box(box.id)  # as if the row were lost
    name = f"wt_{hex_of(box.id)}"
    assert name in db.discover(pg_host)
    db.destroy_by_name(pg_host, name)
    assert leftovers(pg_cluster, box.id) == NOTHING
    assert name not in db.discover(pg_host)
    with pytest.raises(WtboxError):
        db.destroy_by_name(pg_host, "postgres")
    pg_host.destroy_orphan(box.id)


def test_gc_removes_database_orphans(pg_host, pg_cluster, make_repo):
    """A box whose registry row is lost: gc's orphan path (discover → destroy_orphan(id)) drops it by name."""
    from worktreebox.fleet import gc

    repo = make_repo(toml=toml())
    box = pg_host.new("lost", repo=repo)
    pg_host.registry.delete_box(box.id)
    name = f"wt_{hex_of(box.id)}"
    # (gc.run itself is not called: it also sweeps processes of every box on this machine)
    assert "database" in gc.find_orphans(pg_host).get(name, [])
    pg_host.destroy_orphan(name)
    assert leftovers(pg_cluster, box.id) == NOTHING
    assert name not in gc.find_orphans(pg_host)


def test_discover_ignores_boxes_of_other_hosts_on_a_shared_server(pg_host, pg_cluster, make_repo, tmp_path,
                                                                   monkeypatch):
    """Another host uses the session cluster as an external server; pg_host owns it as embedded."""
    from worktreebox.host import Host

    other = Host(tmp_path / "other")
    monkeypatch.setenv("WTBOX_POSTGRES_URL", pg_cluster.url)
    assert other.config.database_provider == "external"  # read now, while the URL is set
    monkeypatch.delenv("WTBOX_POSTGRES_URL")
    repo = make_repo(toml=toml())
    theirs = other.new("theirs", repo=repo)
    try:
        mine = pg_host.new("mine", repo=repo)
        db = pg_host.resource("database")
        assert mine.id in db.discover(pg_host) and f"wt_{hex_of(theirs.id)}" not in db.discover(pg_host)
        assert db.discover(other) == {theirs.id}
        # gc's orphan path on one host leaves the other's box alone
        pg_host.destroy_orphan(f"wt_{hex_of(theirs.id)}")
        assert leftovers(pg_cluster, theirs.id) != NOTHING
    finally:
        other.rm(theirs.id, force=True)
        other.registry.close()
    assert leftovers(pg_cluster, theirs.id) == NOTHING


def test_discover_never_starts_a_cluster(tmp_path, monkeypatch):
    from worktreebox.host import Host
    from worktreebox.resources.database import Database

    monkeypatch.delenv("WTBOX_POSTGRES_URL", raising=False)
    host = Host(tmp_path / "fresh")
    assert Database().discover(host) == set()
    assert not (tmp_path / "fresh" / "postgres").exists()


def test_socket_dir_moves_to_tmp_for_long_homes(tmp_path):
    from worktreebox.providers.postgres.embedded import EmbeddedCluster

    short = EmbeddedCluster(tmp_path / "h")
    assert short.socket_dir == tmp_path / "h" / "postgres-socket"
    long_home = tmp_path / ("x" * 90)
    sock = EmbeddedCluster(long_home).socket_dir
    assert str(sock).startswith("/tmp/wtbox-pg-") and len(str(sock)) + len("/.s.PGSQL.65535") <= 107
    assert sock == EmbeddedCluster(long_home).socket_dir  # derived, stable


def test_cluster_runs_unprivileged_when_root(pg_cluster):
    st = pg_cluster.cluster.status()
    assert st["running"] and st["pid"]
    uid = int(next(line for line in Path(f"/proc/{st['pid']}/status").read_text().splitlines()
                   if line.startswith("Uid:")).split()[1])
    if os.geteuid() == 0:
        assert uid != 0 and st["os_user"] in ("postgres", "wtbox-pg")
        assert pg_cluster.cluster.data_dir.stat().st_uid == uid
    else:
        assert uid == os.geteuid()
    settings = dict(pg_cluster.sql("SELECT name, setting FROM pg_settings WHERE name IN "
                                   "('fsync', 'synchronous_commit', 'full_page_writes', 'listen_addresses')"))
    assert settings == {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
                        "listen_addresses": "127.0.0.1"}
    hba = pg_cluster.sql("SELECT type, user_name, auth_method FROM pg_hba_file_rules")
    assert all(r[2] == "scram-sha-256" for r in hba if r[0] == "host")
    assert [r for r in hba if r[2] == "trust"] == [("local", ["postgres"], "trust")]


def test_twenty_parallel_new_start_a_stopped_cluster_once(pg_host, pg_cluster, make_repo, monkeypatch):
    """20 `wtbox new` processes hit a stopped cluster at once: one start, 20 working, distinct databases."""
    repo = make_repo(toml=toml())
    env = {**os.environ, "WTBOX_HOME": str(pg_cluster.home), "WTBOX_NO_AUTO_GC": "1"}
    env.pop("WTBOX_POSTGRES_URL", None)

    def wtbox(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([PY, "-m", "worktreebox.cli.main", *args], capture_output=True, text=True, env=env,
                              timeout=180)

    stop = wtbox("db", "stop", "--json")
    assert stop.returncode == 0, stop.stderr
    assert json.loads(wtbox("db", "status", "--json").stdout)["running"] is False
    barrier = threading.Barrier(20)

    def one(i: int) -> subprocess.CompletedProcess:
        barrier.wait()
        return wtbox("new", f"par-{i}", "--repo", str(repo), "--json", "--show-secrets")

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    failures = [r.stderr for r in results if r.returncode != 0]
    assert not failures, failures[:2]
    outs = [json.loads(r.stdout) for r in results]
    urls = {o["database"]["url"] for o in outs}
    assert len(urls) == 20 and len({o["database"]["name"] for o in outs}) == 20
    log = (pg_cluster.cluster.log_file).read_text()
    assert log.count("database system is ready to accept connections") == 2  # session start + this one
    for o in outs:
        with psycopg.connect(o["database"]["url"], autocommit=True) as conn:
            conn.execute("CREATE TABLE mine (id text)")
            conn.execute("INSERT INTO mine VALUES (%s)", (o["id"],))
            assert conn.execute("SELECT id FROM mine").fetchall() == [(o["id"],)]
    status = json.loads(wtbox("db", "status", "--json").stdout)
    assert status["running"] is True and status["port"] == pg_cluster.port
    for o in outs:
        pg_host.rm(o["id"], force=True)
    # its own boxes' roles (the worker's cluster also serves other tests' boxes)
    mine = [o["database"]["user"] for o in outs]
    assert pg_cluster.sql("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (mine,)) == []


def test_secrets_stay_out_of_ls_and_status(pg_host, make_repo, run_wtbox, pg_cluster):
    repo = make_repo(toml=toml())
    with pg_host.new("quiet", repo=repo) as box:
        pw = box.data["database"]["password"]
        env = {"WTBOX_HOME": str(pg_cluster.home), "WTBOX_POSTGRES_URL": ""}
        for args in (("ls", "--json"), ("status", box.id, "--json"), ("ls",), ("status", box.id)):
            out = run_wtbox(*args, env=env)
            assert pw not in out.stdout + out.stderr
        shown = run_wtbox("status", box.id, "--json", "--show-secrets", env=env).stdout
        assert pw in shown
        assert oct(box.env_file.stat().st_mode & 0o777) == "0o600" and pw in box.env_file.read_text()


# ------------------------------------------------------------------ end to end: a real app in 5 boxes

APP_DIR = APPS / "dbapp"


def test_app_suite_passes_in_five_boxes_but_fails_when_two_share_a_schema(make_repo, run_wtbox, wtbox_home,
                                                                          shared_postgres, tmp_path):
    files = {p.name: p.read_text() for p in APP_DIR.iterdir() if p.is_file() and p.suffix in (".py", ".toml")}
    toml_text = files.pop("wtbox.toml")
    repo = make_repo(files, toml=toml_text)
    # `python` in the app's migrate command and in `wtbox exec` is the venv's (it has psycopg)
    env = {"PATH": f"{Path(PY).parent}:{os.environ['PATH']}"}
    # Other test sessions on this machine run servers on low ports of the default range too.
    low = random.randrange(21000, 31000, 100)
    env["WTBOX_PORT_RANGE"] = f"{low}-{low + 99}"
    assert os.environ["WTBOX_POSTGRES_URL"] == shared_postgres.url  # external server mode, shared cluster

    with ThreadPoolExecutor(5) as pool:
        outs = list(pool.map(lambda i: json.loads(run_wtbox("new", f"app-{i}", "--repo", str(repo), "--json",
                                                            "--no-services", env=env).stdout), range(5)))
    ids = [o["id"] for o in outs]
    assert all(o["database"]["mode"] == "schema" and "***" in o["database"]["url"] for o in outs)

    def suite(box_id: str, extra: dict | None = None) -> subprocess.CompletedProcess:
        # the box's processes get the environment fixed when it was made, not the caller's:
        # variables for this one run go on the command line
        sets = [f"{k}={v}" for k, v in (extra or {}).items()]
        return run_wtbox("exec", box_id, "--", "env", *sets, "python", "check_app.py", check=False,
                         env=env, timeout=180)

    dirs = {o["id"]: Path(o["dir"]) / "tmp" for o in outs}  # each box's own temp dir: the host sees it

    def start_line(boxes: list[str]) -> None:
        """All copies start their tests at the same moment, so any sharing shows deterministically:
        each says `ready` in its own temp dir, and all are told `go` together."""
        for b in boxes:
            (dirs[b] / "ready").unlink(missing_ok=True)
            (dirs[b] / "go").unlink(missing_ok=True)
        assert wait_for(lambda: all((dirs[b] / "ready").exists() for b in boxes), timeout=120)
        for b in boxes:
            (dirs[b] / "go").touch()

    try:
        with ThreadPoolExecutor(6) as pool:
            runs = [pool.submit(suite, i, {"DBAPP_BARRIER": str(dirs[i])}) for i in ids]
            start_line(ids)
            results = [r.result() for r in runs]
        assert [r.returncode for r in results] == [0] * 5, [r.stderr[-1500:] for r in results if r.returncode]
        assert all("Ran 2 tests" in r.stderr and "OK" in r.stderr for r in results)

        # Two copies on one schema: box 1's suite with box 0's database settings, at the same time.
        a_env = json.loads(run_wtbox("env", ids[0], "--format", "json").stdout)
        shared = {k: a_env[k] for k in a_env if k.startswith("POSTGRES_")}
        assert set(shared) == {"POSTGRES_SERVER", "POSTGRES_PORT", "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}
        with ThreadPoolExecutor(3) as pool:
            # box 1's checkout and port, box 0's database settings
            runs = [pool.submit(suite, ids[0], {"DBAPP_BARRIER": str(dirs[ids[0]])}),
                    pool.submit(suite, ids[1], {"DBAPP_BARRIER": str(dirs[ids[1]]), **shared})]
            start_line(ids[:2])
            clash = [r.result() for r in runs]
        assert any(r.returncode != 0 for r in clash), [r.stderr[-500:] for r in clash]
        assert any("AssertionError" in r.stderr for r in clash)
    finally:
        run_wtbox("rm", "--force", *ids)


def test_failed_golden_migration_leaves_no_golden(pg_host, pg_cluster, make_repo):
    repo = make_repo({"migrate.py": "print('half way'); raise SystemExit(3)\n", "migrations/001.sql": "SELECT 1;"},
                     toml=toml(f'mode = "database"\nmigrate = "{PY} migrate.py"'))
    before = pg_cluster.sql("SELECT datname FROM pg_database WHERE datname LIKE 'wt_golden_%%'")
    roles = "SELECT rolname FROM pg_roles WHERE rolname ~ '^wt_[0-9a-f]{8}$' ORDER BY 1"
    roles_before = pg_cluster.sql(roles)  # the worker's cluster also serves other tests' boxes
    with pytest.raises(WtboxError, match=r"exit code 3(.|\n)*half way"):
        pg_host.new("badgold", repo=repo)
    assert pg_cluster.sql("SELECT datname FROM pg_database WHERE datname LIKE 'wt_golden_%%'") == before
    assert pg_cluster.sql(roles) == roles_before


def test_fsync_setting_is_an_opt_out(tmp_path):
    from worktreebox.config.load import HostConfig
    from worktreebox.providers.postgres.embedded import EmbeddedCluster

    for fsync_off, expect in ((True, True), (False, False)):
        cluster = EmbeddedCluster(tmp_path, HostConfig(fsync_off=fsync_off))
        cluster.data_dir.mkdir(exist_ok=True)
        cluster._write_conf(5555, cluster.socket_dir, None)
        conf = (cluster.data_dir / "wtbox.conf").read_text()
        assert ("fsync = off" in conf) is expect and "port = 5555" in conf


def test_one_superuser_connection_per_process(pg_host, pg_cluster, make_repo):
    repo = make_repo(toml=toml())

    def wtbox_sessions() -> int:
        return pg_cluster.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'wtbox'")[0][0]

    before = wtbox_sessions()  # earlier tests of this process may hold cached connections already
    first = pg_host.new("c1", repo=repo)
    n = wtbox_sessions()
    boxes = [pg_host.new(f"c{i}", repo=repo) for i in range(2, 6)]
    assert wtbox_sessions() == n <= before + 2
    for b in [first, *boxes]:
        pg_host.rm(b.id, force=True)
    assert wtbox_sessions() == n


@pytest.mark.parametrize("mode", ["database", "schema"])
def test_a_hung_migration_fails_new_after_database_timeout(host, make_repo, mode):
    """Defect 6: `[database] migrate` had no timeout of its own: `sleep 1000` hung `new` silently."""
    repo = make_repo(toml=toml(f'mode = "{mode}"\nmigrate = "echo migrating; sleep 1000"\ntimeout = "2s"'))
    t0 = time.monotonic()
    with pytest.raises(WtboxError) as err:
        host.new("hung", repo=repo)
    assert time.monotonic() - t0 < 30
    assert "did not finish within 2s ([database] timeout)" in str(err.value) and "migrating" in str(err.value)
    assert host.list() == []
