"""Database figures for scripts/bench.py: what the database resource adds to `new` and `rm`.

Runs against its own embedded cluster in a temp WTBOX_HOME (started here, stopped at the end):

- schema mode: `Database.create` and the whole `Host.new` (vs mode "none") against the raw DDL
  floor (CREATE ROLE + CREATE SCHEMA + ALTER ROLE … SET search_path on an open connection);
- database mode: `Database.create` (clone of a migrated 30-table golden DB) against a raw
  CREATE DATABASE … TEMPLATE with each strategy, and against re-running the migrations;
- rm of the database part in both modes (`Database.destroy`).

Standalone: .venv/bin/python scripts/bench_db.py --runs 10
"""
from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PY = sys.executable
TABLES = 30
MIGRATE = '''import os, pathlib, psycopg
with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as c:
    for f in sorted(pathlib.Path("migrations").glob("*.sql")):
        c.execute(f.read_text())
'''


def _summary(values: list[float]) -> dict:
    v = sorted(values)

    def pct(p: float) -> float:
        k = (len(v) - 1) * p
        lo, hi = int(k), min(int(k) + 1, len(v) - 1)
        return v[lo] + (v[hi] - v[lo]) * (k - lo)

    return {"p50_ms": round(pct(0.5) * 1000, 1), "p90_ms": round(pct(0.9) * 1000, 1), "n": len(v)}


def _p50(values: list[float]) -> float:
    return statistics.median(values) * 1000


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _migration_sql() -> str:
    out = []
    for i in range(TABLES):
        ref = f", parent_id int REFERENCES t{i - 1}(id)" if i else ""
        out.append(f"CREATE TABLE t{i} (id serial PRIMARY KEY, name text NOT NULL, created_at timestamptz "
                   f"DEFAULT now(){ref});\nCREATE INDEX t{i}_name ON t{i} (name);")
    out.append("INSERT INTO t0 (name) SELECT 'seed ' || g FROM generate_series(1, 100) g;")
    return "\n".join(out) + "\n"


def _repo(dest: Path, mode: str) -> Path:
    dest.mkdir(parents=True)
    (dest / "migrations").mkdir()
    (dest / "migrations" / "001_tables.sql").write_text(_migration_sql())
    (dest / "migrate.py").write_text(MIGRATE)
    (dest / "wtbox.toml").write_text(
        f'[box]\nports = []\n[database]\nmode = "{mode}"\nmigrate = "{PY} migrate.py"\n'
        "[observability]\nenabled = false\n")
    for args in (["init", "-q", "-b", "main"], ["add", "-A"],
                 ["-c", "user.email=b@e", "-c", "user.name=bench", "commit", "-q", "-m", "init"]):
        subprocess.run(["git", "-C", str(dest), *args], check=True, capture_output=True)
    return dest


def _creation(host, repo: Path, config):
    from worktreebox.box import Box, branch_name, new_id
    from worktreebox.resources.base import Creation
    from worktreebox.system import git

    box_id = new_id("bench")
    box = Box(id=box_id, task="bench", repo=str(repo), branch=branch_name(box_id), dir=host.boxes_dir / box_id)
    return Creation(host=host, box=box, config=config, base_sha=git.resolve_commit(repo, "HEAD"))


def bench_database(runs: int = 10) -> dict:
    """Run the database benchmarks on a private embedded cluster; p50/p90 in ms."""
    from worktreebox.host import Host, load_repo_config_file
    from worktreebox.providers.postgres import server
    from worktreebox.providers.postgres.golden import clone, run_migrate
    from worktreebox.resources.database import Database, golden_for

    saved_url = os.environ.pop("WTBOX_POSTGRES_URL", None)
    work = Path(tempfile.mkdtemp(prefix="wtbox-bench-db-"))
    home = work / "home"
    host = Host(home)
    srv = server(host)
    out: dict = {}
    try:
        out["cluster_first_start_ms"] = round(_timed(srv.ensure_running) * 1000, 1)  # initdb + start
        db = Database()

        # ---- schema mode
        schema_repo = _repo(work / "schema-repo", "schema")
        none_repo = _repo(work / "none-repo", "none")
        cfg = load_repo_config_file(schema_repo)
        cfg.database.migrate = None  # the resource's own cost, not the app's migrations
        creates, destroys = [], []
        for _ in range(runs):
            c = _creation(host, schema_repo, cfg)
            creates.append(_timed(lambda: db.create(c)))  # noqa: B023 (called before the loop moves on)
            destroys.append(_timed(lambda: db.destroy(host, c.box)))  # noqa: B023 (called before the loop moves on)
        out["schema_create"] = _summary(creates)
        out["schema_rm"] = _summary(destroys)

        floor = []
        with srv.session() as conn:
            for i in range(runs):
                name = f"wt_bench{i:04d}"

                def ddl() -> None:
                    with conn.transaction():
                        conn.execute(f"CREATE ROLE {name} LOGIN PASSWORD 'x'")  # noqa: B023 (called before the loop moves on)
                        conn.execute(f"CREATE SCHEMA {name} AUTHORIZATION {name}")  # noqa: B023 (called before the loop moves on)
                        conn.execute(f"ALTER ROLE {name} SET search_path = {name}, public")  # noqa: B023 (called before the loop moves on)

                floor.append(_timed(ddl))
                conn.execute(f"DROP SCHEMA {name} CASCADE")
                conn.execute(f"DROP ROLE {name}")
        out["raw_role_schema_floor"] = _summary(floor)

        # the whole `new`: what schema mode adds on top of a box without a database
        none_cfg = load_repo_config_file(none_repo)
        new_schema, new_none = [], []
        for _ in range(runs):
            for repo, conf, sink in ((schema_repo, cfg, new_schema), (none_repo, none_cfg, new_none)):
                t0 = time.perf_counter()
                box = host.new("bench", repo=repo, config=conf, start_services=False)
                sink.append(time.perf_counter() - t0)
                host.rm(box.id, force=True)
        out["new_schema_mode"] = _summary(new_schema)
        out["new_no_database"] = _summary(new_none)
        out["schema_added_to_new_ms"] = round(_p50(new_schema) - _p50(new_none), 1)

        # ---- database mode
        db_repo = _repo(work / "database-repo", "database")
        dcfg = load_repo_config_file(db_repo)
        c0 = _creation(host, db_repo, dcfg)
        golden = golden_for(c0, srv)
        # migrate once (in the repo's own checkout: a tree with what the migration needs) + strategy probe
        out["golden_build_ms"] = round(_timed(lambda: golden.ensure(db_repo)) * 1000, 1)
        creates, destroys = [], []
        for _ in range(runs):
            c = _creation(host, db_repo, dcfg)
            creates.append(_timed(lambda: db.create(c)))  # noqa: B023 (called before the loop moves on)
            destroys.append(_timed(lambda: db.destroy(host, c.box)))  # noqa: B023 (called before the loop moves on)
        out["database_create"] = _summary(creates)
        out["database_rm"] = _summary(destroys)

        by_strategy: dict[str, list[float]] = {"WAL_LOG": [], "FILE_COPY": []}
        with srv.session() as conn:
            owner = conn.info.user
            for i in range(runs):
                for strategy, sink in by_strategy.items():
                    name = f"wt_bench_clone{i}"
                    sink.append(_timed(lambda: clone(conn, name, golden.name, owner, strategy)))  # noqa: B023 (called before the loop moves on)
                    conn.execute(f"DROP DATABASE {name} WITH (FORCE)")
            out["clone_strategy_chosen"] = golden.strategy(conn)
        for strategy, sink in by_strategy.items():
            out[f"raw_clone_{strategy.lower()}"] = _summary(sink)

        # the alternative: an empty database per box, migrations re-run in it
        remigrate = []
        from psycopg import sql

        for i in range(runs):
            name = f"wt_bench_mig{i}"
            with srv.session() as conn:
                conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'pw'").format(sql.Identifier(name)))
            url = srv.box_url(name, "pw", name)

            def fresh() -> None:
                with srv.session() as conn:
                    conn.execute(sql.SQL("CREATE DATABASE {0} OWNER {0}").format(sql.Identifier(name)))  # noqa: B023 (called before the loop moves on)
                run_migrate(dcfg.database.migrate, db_repo, {**os.environ, "DATABASE_URL": url}, work / "logs", [])  # noqa: B023 (called before the loop moves on)

            remigrate.append(_timed(fresh))
            with srv.session() as conn:
                conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))
        out["empty_db_plus_migrations"] = _summary(remigrate)
        out["database_mode_saves_ms"] = round(_p50(remigrate) - _p50(creates), 1)
        out["targets"] = {
            "schema_added_to_new_ms<=60": out["schema_added_to_new_ms"] <= 60,
            "raw_clone_30_tables_ms<=250": min(_p50(v) for v in by_strategy.values()) <= 250,
            "rm_database_part_ms<=100": max(out["schema_rm"]["p50_ms"], out["database_rm"]["p50_ms"]) <= 100,
        }
    finally:
        with contextlib.suppress(Exception):
            for b in host.list():
                host.rm(b.id, force=True)
        with contextlib.suppress(Exception):
            srv.stop()  # type: ignore[attr-defined]
        host.registry.close()
        shutil.rmtree(work, ignore_errors=True)
        if saved_url is not None:
            os.environ["WTBOX_POSTGRES_URL"] = saved_url
    return out


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    print(json.dumps(bench_database(ap.parse_args().runs), indent=2))
