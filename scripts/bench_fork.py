#!/usr/bin/env python3
"""Benchmark of snapshot, restore, fork and db reset; scripts/bench.py imports bench_fork() (`--only fork`).

On a box whose database holds ~50 MB of rows and whose service sleeps 3 s before it binds its port,
each figure against what it can be compared with in the same run:
- the copy floor: `CREATE DATABASE … TEMPLATE` of a database holding the same data, on this disk (each
  strategy; and with the box's strategy right before each snapshot, the floor the goals are held to);
- `wtbox snapshot` (the whole CLI process) and how long the box was paused (its `paused_ms`);
- `wtbox restore` until the service answers again, after a data change (the service keeps running)
  and after a file change (the service is restarted: its own start time is in it);
- `wtbox fork` until the fork's service answers, against `wtbox new --no-pool` until it answers;
  `wtbox fork -n 5` until all five answer; `wtbox fork` of a box whose files are its commit's (data
  changed only) with a pooled box ready (the pool's box gets the data; its service is up already);
- `wtbox db reset` (a spare copy of the golden database swapped in);
- disk per snapshot: the box's own changes (files, database) against the commit's tree.

    .venv/bin/python scripts/bench_fork.py [--runs 5]
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_pool import SERVER, SLOW_START, _answers  # noqa: E402 (the same slow app as the pool's bench)

PY = sys.executable
ROWS = 180_000  # ~50 MB: 256 bytes of text per row plus its tuple overhead
TOML = (f'[box]\nports = ["web"]\n\n[database]\nmode = "database"\n'
        "migrate = \"psql -q -v ON_ERROR_STOP=1 -c 'CREATE TABLE items (id serial PRIMARY KEY, note text)'\"\n\n"
        '[observability]\nenabled = false\n\n'
        f'[services.web]\ncmd = "{PY} slow_server.py {{{{ ports.web }}}}"\n'
        'ready = "http://127.0.0.1:{{ ports.web }}/"\nready_timeout = "30s"\n')


def _wtbox(env: dict, *args: str) -> dict | list:
    # the `wtbox` a user runs: the launcher, served by the home's CLI server (everything imported once)
    proc = subprocess.run([str(Path(PY).parent / "wtbox"), *args, "--json"], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"wtbox {' '.join(args)} failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def _until_answers(env: dict, *args: str) -> tuple[float, list[dict]]:
    """Seconds from starting `wtbox ARGS --json` until every box it names answers on its web port."""
    t0 = time.perf_counter()
    out = _wtbox(env, *args)
    rows = out if isinstance(out, list) else [out]
    for port in [r["ports"]["web"] for r in rows if "ports" in r]:
        while not _answers(port):
            time.sleep(0.005)
    return time.perf_counter() - t0, rows


def _answer_after(env: dict, port: int, *args: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    out = _wtbox(env, *args)
    while not _answers(port):
        time.sleep(0.005)
    return time.perf_counter() - t0, out  # type: ignore[return-value]


def _make_repo(repo: Path) -> None:
    repo.mkdir()
    for args in (["init", "-q", "-b", "main"], ["config", "user.email", "b@example.com"],
                 ["config", "user.name", "Bench"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True)
    (repo / "slow_server.py").write_text(SERVER)
    (repo / "wtbox.toml").write_text(TOML)
    for i in range(600):  # a tree of some size (~6 MB), so that "the box's changes, not the tree" shows
        d = repo / "src" / f"pkg{i % 20}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"mod{i}.py").write_text(f"# module {i}\n" + "x = 1  # padding\n" * 600)
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(repo), "commit", "-qm", "bench"], check=True)


def _fill(url: str) -> int:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO items (note) SELECT repeat(md5(i::text), 8) FROM generate_series(1, %s) i", (ROWS,))
        conn.execute("VACUUM ANALYZE items")
        return conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]


def _copy_floor(host, box, runs: int) -> dict:
    """CREATE DATABASE … TEMPLATE of a database holding the box's data (one of its snapshots: no sessions),
    with each strategy; the snapshot "floor" is kept for `_floor_once` (interleaved with the snapshots)."""
    from bench import summary

    from worktreebox.fleet import snapshots

    snap = snapshots.take(host, box, "floor")
    srv = snapshots.server_of(host, box)
    strategy = snap.meta["database"]["strategy"]
    out = {"strategy": strategy}
    for name in (strategy, "WAL_LOG", "FILE_COPY") if strategy else ("WAL_LOG", "FILE_COPY"):
        out[name] = summary([_floor_once(srv, snap.database, name) for _ in range(runs)])
    return out


def _floor_once(srv, template: str, strategy: str | None) -> float:
    from worktreebox.providers.postgres.boxdb import ident, sql_text

    clause = f" STRATEGY {strategy}" if strategy else ""
    with srv.session(srv.shared_db) as conn:
        t0 = time.perf_counter()
        conn.execute(sql_text("CREATE DATABASE {d} TEMPLATE {t}" + clause, d=ident("wt_floor"), t=ident(template)))
        took = time.perf_counter() - t0
        conn.execute("DROP DATABASE wt_floor")
    return took


def _wait_spares(host, box, want: int, timeout: float = 60.0) -> None:
    from worktreebox.fleet import snapshots
    from worktreebox.providers.postgres import spares

    key = box.data["database"]["golden"]["key"]
    srv = snapshots.server_of(host, box)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with srv.session(srv.shared_db) as conn:
            if spares.count(conn, key) >= want:
                return
        time.sleep(0.1)


def bench_fork(runs: int = 5, work: Path | None = None) -> dict:
    from bench import remove_boxes, summary

    from worktreebox.host import Host

    runs = max(3, min(runs, 7))
    work = Path(work or tempfile.mkdtemp(prefix="wtbox-bench-fork-"))
    base = Path(tempfile.mkdtemp(prefix="fork-", dir=work))
    home, repo = base / "home", base / "repo"
    _make_repo(repo)
    import random

    # below the kernel's ephemeral ports (32768-60999 here: any outgoing connection may take one of
    # those, and a service then fails to bind), above the tests' 20000-29999 and bench_browser's
    lo = 31000 + random.randrange(8) * 200
    env = {**os.environ, "WTBOX_HOME": str(home), "WTBOX_NO_AUTO_GC": "1", "WTBOX_PORT_RANGE": f"{lo}-{lo + 199}"}
    env.pop("WTBOX_POSTGRES_URL", None)  # its own embedded cluster
    os.environ.update({k: env[k] for k in ("WTBOX_HOME", "WTBOX_PORT_RANGE")})
    os.environ.pop("WTBOX_POSTGRES_URL", None)
    host = Host(home)
    try:
        a = _wtbox(env, "new", "source", "--repo", str(repo))
        source, port = a["id"], a["ports"]["web"]
        box = host.get(source)
        db_bytes = _fill(box.env["DATABASE_URL"])
        (box.path / "notes.txt").write_text("a change of the box's own\n")
        out: dict = {"service_start_s": SLOW_START, "database_mb": round(db_bytes / 2**20, 1)}
        out["copy_floor"] = _copy_floor(host, box, runs)
        from worktreebox.fleet import snapshots

        floor_db, strategy = snapshots.get(box, "floor").database, out["copy_floor"]["strategy"]
        srv = snapshots.server_of(host, box)
        snap_t, paused, copied, floor_t = [], [], [], []
        for i in range(runs):  # each snapshot right after a floor copy: the same load on this shared host
            floor_t.append(_floor_once(srv, floor_db, strategy))
            t0 = time.perf_counter()
            s = _wtbox(env, "snapshot", source, f"s{i}")
            snap_t.append(time.perf_counter() - t0)
            paused.append(s["paused_ms"] / 1000)
            copied.append(s["copy_ms"] / 1000)
        snapshots.remove(host, box, "floor")
        out["copy_floor_beside_snapshots"] = summary(floor_t)
        floor = out["copy_floor_beside_snapshots"]["p50_ms"]
        out["snapshot"] = summary(snap_t)
        out["snapshot_paused"] = summary(paused)
        out["snapshot_copy_in_pause"] = summary(copied)
        out["snapshot_disk"] = {"files_bytes": s["files_bytes"], "database_bytes": s["database"]["bytes"],
                                "tree_bytes": _tree_bytes(home, box)}

        import psycopg

        data_t, file_t = [], []
        for _ in range(runs):
            with psycopg.connect(box.env["DATABASE_URL"], autocommit=True) as conn:
                conn.execute("INSERT INTO items (note) VALUES ('later')")
            data_t.append(_answer_after(env, port, "restore", source, "s0")[0])
        for i in range(2):
            (box.path / "later.txt").write_text(f"{i}\n")
            file_t.append(_answer_after(env, port, "restore", source, "s0")[0])
        out["restore_after_data_change_until_answers"] = summary(data_t)
        out["restore_after_file_change_until_answers"] = summary(file_t)

        fork_t, new_t = [], []
        for i in range(3):
            s, rows = _until_answers(env, "fork", source, "--task", f"fork{i}")
            fork_t.append(s)
            host.rm(rows[0]["id"], force=True)
            s, rows = _until_answers(env, "new", f"fresh{i}", "--repo", str(repo), "--no-pool")
            new_t.append(s)
            host.rm(rows[0]["id"], force=True)
        out["fork_until_answers"] = summary(fork_t)
        out["new_no_pool_until_answers"] = summary(new_t)
        s, rows = _until_answers(env, "fork", source, "-n", "5", "--task", "five")
        out["fork_5_until_all_answer"] = summary([s])
        for r in rows:
            host.rm(r["id"], force=True)

        out["fork_from_pool_until_answers"] = _fork_from_pool(host, env, repo, runs=3)

        reset_t, reset_cli = [], []
        want = host.config.database_spares
        for _ in range(runs):
            _wait_spares(host, box, want)
            t0 = time.perf_counter()
            r = _wtbox(env, "db", "reset", source)
            reset_cli.append(time.perf_counter() - t0)
            reset_t.append(r["seconds"])
        out["db_reset_in_process"] = summary(reset_t)
        out["db_reset_cli"] = summary(reset_cli)
        _goals(out, floor)
        return out
    finally:
        remove_boxes(host)
        try:
            host.database_server().stop()
        except Exception:
            pass
        subprocess.run([str(Path(PY).parent / "wtbox"), "server", "stop"], env=env, capture_output=True)
        host.registry.close()
        shutil.rmtree(base, ignore_errors=True)


def _fork_from_pool(host, env: dict, repo: Path, runs: int) -> dict:
    """`wtbox fork` of a box whose files are its commit's (its data changed: ~50 MB of rows) with a
    pooled box ready: the fork is that box with the data put in, its service up already."""
    from bench import summary

    from worktreebox.fleet import pool as P

    mid = _wtbox(env, "new", "datamid", "--repo", str(repo), "--no-pool")
    _fill(host.get(mid["id"]).env["DATABASE_URL"])
    host.registry.set_pool_size(str(repo), 1)
    target = P.resolve_target(repo)
    times = []
    try:
        for i in range(runs):
            P.top_up(host, target, 1)
            s, rows = _until_answers(env, "fork", mid["id"], "--task", f"pooled{i}")
            assert rows[0]["from_pool"], rows[0]
            times.append(s)
            host.rm(rows[0]["id"], force=True)
    finally:
        P.drain(host, str(repo))
        host.rm(mid["id"], force=True)
    return summary(times)


def _tree_bytes(home: Path, box) -> int:
    from worktreebox.system.fsutil import own_bytes

    return own_bytes(home / "trees" / box.data["worktree"]["tree"])


def _goals(out: dict, floor: float) -> None:
    """The issue's goals, each with the bound it was held to in this run."""
    snap_goal = max(300.0, floor + 100)
    out["goals"] = {
        "snapshot_ms": [out["snapshot"]["p50_ms"], snap_goal, out["snapshot"]["p50_ms"] <= snap_goal],
        "paused_ms": [out["snapshot_paused"]["p50_ms"], floor + 50, out["snapshot_paused"]["p50_ms"] <= floor + 50],
        "restore_ms": [out["restore_after_data_change_until_answers"]["p50_ms"], max(1000.0, floor + 700),
                       out["restore_after_data_change_until_answers"]["p50_ms"] <= max(1000.0, floor + 700)],
        "fork_no_pool_ms": [out["fork_until_answers"]["p50_ms"], out["new_no_pool_until_answers"]["p50_ms"] + 300,
                            out["fork_until_answers"]["p50_ms"] <= out["new_no_pool_until_answers"]["p50_ms"] + 300],
        "fork_5_ms": [out["fork_5_until_all_answer"]["p50_ms"], 2 * out["fork_until_answers"]["p50_ms"],
                      out["fork_5_until_all_answer"]["p50_ms"] <= 2 * out["fork_until_answers"]["p50_ms"]],
        "db_reset_ms": [out["db_reset_in_process"]["p50_ms"], 150, out["db_reset_in_process"]["p50_ms"] <= 150],
        "fork_pool_ms": [out["fork_from_pool_until_answers"]["p50_ms"], 1000,
                         out["fork_from_pool_until_answers"]["p50_ms"] <= 1000],
    }


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    print(json.dumps(bench_fork(a.runs), indent=2))
