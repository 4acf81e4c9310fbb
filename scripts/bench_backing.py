"""Backing-service figures for scripts/bench.py (issue 29): per kind that runs here, start until ready
and idle RSS per box; and `new` of a repo with PostgreSQL + Redis against the same repo with
PostgreSQL only.

- start: `new --json`'s `backing_start` timing (launch every instance, their output keeper, wait
  until each answers its protocol probe; after a sandboxed box's wait for its network, which the
  `backing` phase includes), for a box with that one kind; goal for Redis: <= 100 ms.
- idle RSS: the processes of the box's backing cgroup leaf 2 s after `new` (the box's output
  keeper, shared by all its backing services, is given on its own line; the sandbox's holder and
  the supervisor are not the kind's); goal for Redis: <= 10 MB.
  USS beside it: what one more box costs (the program's code pages are shared by every box).
- new_pg_redis / new_pg: whole `wtbox new` processes, alternated, on one embedded PostgreSQL
  cluster started for this run; goal: ratio <= 1.10.

Standalone: .venv/bin/python scripts/bench_backing.py --runs 5
"""
from __future__ import annotations

import json
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
BARE = '[database]\nmode = "none"\n[observability]\nenabled = false\n'
IMAGES = {"redis": "redis:7", "memcached": "memcached:1.6", "rabbitmq": "rabbitmq:3", "smtp": "axllent/mailpit",
          "s3": "minio/minio"}
SLOW_KINDS = {"rabbitmq"}  # an Erlang VM boot (~5 s): measured once, not `runs` times
IDLE_WAIT = 2.0


def _wtbox(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WTBOX_HOME": str(home), "WTBOX_NO_AUTO_GC": "1"}
    env.pop("WTBOX_POSTGRES_URL", None)
    proc = subprocess.run([PY, "-m", "worktreebox.cli.main", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"wtbox {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def _repo(dest: Path, toml: str) -> Path:
    dest.mkdir(parents=True)
    (dest / "wtbox.toml").write_text(toml)
    (dest / "README.md").write_text("bench\n")
    for args in (["init", "-q", "-b", "main"], ["add", "-A"],
                 ["-c", "user.email=b@e", "-c", "user.name=b", "commit", "-qm", "bench"]):
        subprocess.run(["git", "-C", str(dest), *args], check=True, capture_output=True)
    return dest


def _summary(values: list[float]) -> dict:
    v = sorted(values)
    p90 = v[min(len(v) - 1, round(0.9 * (len(v) - 1)))]
    return {"p50_ms": round(statistics.median(v) * 1000, 1), "p90_ms": round(p90 * 1000, 1),
            "min_ms": round(v[0] * 1000, 1), "max_ms": round(v[-1] * 1000, 1), "n": len(v)}


def _memory_by_name(home: Path, box_id: str) -> dict[str, tuple[int, int]]:
    """(RSS, USS) bytes of the box's backing programs and their output keeper (the processes of its
    backing cgroup leaf: not the sandbox's holder, slirp4netns or the supervisor), summed per kernel
    name. USS is what the box alone costs: a program's code pages (most of a small server's RSS)
    are shared by every box's copy."""
    import psutil

    from worktreebox.providers.backing.native import LEAF
    from worktreebox.system import cgroups

    backend = cgroups.for_home(home)
    pids = backend.pids(box_id, LEAF) if backend is not None else {
        p.pid for p in psutil.process_iter() if _environ(p).get("WTBOX_ID") == box_id}
    out: dict[str, tuple[int, int]] = {}
    for pid in pids:
        try:
            p = psutil.Process(pid)
            m = p.memory_full_info()
            rss, uss = out.get(p.name(), (0, 0))
            out[p.name()] = (rss + m.rss, uss + m.uss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def _environ(p) -> dict[str, str]:
    try:
        return p.environ()
    except Exception:
        return {}


def _kind(home: Path, work: Path, kind: str, runs: int) -> dict:
    repo = _repo(work / f"repo-{kind}", BARE + f'[backing.{kind}]\nimage = "{IMAGES[kind]}"\n')
    starts, rss, uss, keeper = [], [], [], []
    for i in range(1 if kind in SLOW_KINDS else runs):
        box = json.loads(_wtbox(home, "new", f"{kind}-{i}", "--repo", str(repo), "--json").stdout)
        starts.append(box["timings"]["backing_start"])
        time.sleep(IDLE_WAIT)
        by_name = _memory_by_name(home, box["id"])
        keeper.append(by_name.pop("wtbox-keeper", (0, 0))[0])
        rss.append(sum(r for r, _ in by_name.values()))
        uss.append(sum(u for _, u in by_name.values()))
        _wtbox(home, "rm", "--force", box["id"])
    out = {"start": _summary(starts), "idle_rss_mb": round(statistics.median(rss) / 1e6, 1),
           "idle_uss_mb": round(statistics.median(uss) / 1e6, 1),
           "keeper_rss_mb": round(statistics.median(keeper) / 1e6, 1)}
    if kind == "redis":
        out["start_ok"] = out["start"]["p50_ms"] <= 100
        out["idle_rss_ok"] = out["idle_rss_mb"] <= 10
    return out


def _new_ratio(home: Path, work: Path, runs: int) -> dict:
    """`new` with PostgreSQL + Redis against PostgreSQL only, alternated (same cluster, same repo shape)."""
    pg = _repo(work / "repo-pg", '[observability]\nenabled = false\n')
    both = _repo(work / "repo-pg-redis", '[observability]\nenabled = false\n[backing.redis]\nimage = "redis:7"\n')
    for repo in (pg, both):  # warm: the cluster, git's and Python's caches
        box = json.loads(_wtbox(home, "new", "warm", "--repo", str(repo), "--json").stdout)
        _wtbox(home, "rm", "--force", box["id"])
    times: dict[str, list[float]] = {"pg": [], "pg_redis": []}
    for i in range(runs):
        for key, repo in (("pg", pg), ("pg_redis", both)) if i % 2 == 0 else (("pg_redis", both), ("pg", pg)):
            t0 = time.perf_counter()
            box = json.loads(_wtbox(home, "new", f"{key}-{i}", "--repo", str(repo), "--json").stdout)
            times[key].append(time.perf_counter() - t0)
            _wtbox(home, "rm", "--force", box["id"])
    out = {"new_pg": _summary(times["pg"]), "new_pg_redis": _summary(times["pg_redis"])}
    out["ratio"] = round(out["new_pg_redis"]["p50_ms"] / out["new_pg"]["p50_ms"], 3)
    out["ratio_ok"] = out["ratio"] <= 1.10
    return out


def bench_backing(runs: int = 5, work: Path | None = None) -> dict:
    from worktreebox.config.backing import KINDS
    from worktreebox.providers.backing import runtime_class

    scratch = Path(tempfile.mkdtemp(prefix="wtbox-bench-backing-", dir=work))
    home = scratch / "home"
    out: dict = {"pythondontwritebytecode": bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))}
    try:
        for kind in KINDS:
            why = runtime_class(kind, "native").unavailable()
            out[kind] = {"skipped": why} if why else _kind(home, scratch, kind, runs)
        if runtime_class("redis", "native").unavailable() is None:
            out["new_with_redis"] = _new_ratio(home, scratch, runs)
    finally:
        for b in json.loads(_wtbox(home, "ls", "--json").stdout or "[]"):
            _wtbox(home, "rm", "--force", b["id"])
        for args in (["gc", "--spares", "--grace", "0"], ["db", "stop"]):  # spare sandboxes outlive boxes
            try:
                _wtbox(home, *args)
            except RuntimeError:
                pass
        shutil.rmtree(scratch, ignore_errors=True)
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    print(json.dumps(bench_backing(ap.parse_args().runs), indent=2))
