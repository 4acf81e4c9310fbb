#!/usr/bin/env python3
"""Benchmark of the warm pool; scripts/bench.py imports bench_pool() (`--only pool`).

On a repo whose service sleeps 3 s before it binds its port (an app with a slow start):
- `wtbox new` from the pool until the service answers, the whole CLI process included
  (target p50 <= 150 ms), against `wtbox new --no-pool` (the floor is the app's own start)
  and `wtbox ls` (the CLI's own start) in the same run;
- `wtbox fanout -n 5` from a pool of 5 until all five answer (target <= 500 ms);
- idle cost per pooled box: RSS of its processes and their CPU over a 5 s idle window.

    env -u PYTHONDONTWRITEBYTECODE .venv/bin/python scripts/bench_pool.py [--runs 7]
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
PY = sys.executable
SLOW_START = 3.0
FANOUT_N = 5

SERVER = f"""\
import http.server, sys, time
time.sleep({SLOW_START})  # an app that takes a while to start


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""
TOML = (f'[box]\nports = ["web"]\n\n[database]\nmode = "none"\n\n[observability]\nenabled = false\n\n'
        f'[services.web]\ncmd = "{PY} slow_server.py {{{{ ports.web }}}}"\n'
        'ready = "http://127.0.0.1:{{ ports.web }}/"\nready_timeout = "30s"\n')


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _wtbox(env: dict, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([PY, "-m", "worktreebox.cli.main", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"wtbox {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def _until_answers(env: dict, *args: str) -> tuple[float, list[dict]]:
    """Seconds from starting `wtbox ARGS --json` until every box it printed answers on its web port."""
    t0 = time.perf_counter()
    out = json.loads(_wtbox(env, *args, "--json").stdout)
    rows = out if isinstance(out, list) else [out]
    ports = []
    for r in rows:
        ports.append(r["ports"]["web"] if "ports" in r else None)
    for p in ports:
        while p is not None and not _answers(p):
            time.sleep(0.005)
    return time.perf_counter() - t0, rows


def _idle_cost(host, box_ids: list[str], window: float = 5.0) -> dict:
    import psutil

    from worktreebox.system import procs

    found = {}
    for i in box_ids:
        b = host.registry.select_box(i)
        found[i] = procs.find_box_processes(b.id, b.dir)
    cpu0 = {i: sum(sum(p.cpu_times()[:2]) for p in ps) for i, ps in found.items()}
    time.sleep(window)
    rss, cpu = [], []
    for i, ps in found.items():
        try:
            rss.append(sum(p.memory_info().rss for p in ps) / 2**20)
            cpu.append((sum(sum(p.cpu_times()[:2]) for p in ps) - cpu0[i]) / window * 100)
        except psutil.NoSuchProcess:
            continue
    procs_per_box = sum(len(ps) for ps in found.values()) / max(1, len(found))
    return {"rss_mb_per_box": round(sum(rss) / max(1, len(rss)), 1),
            "cpu_percent_per_box": round(sum(cpu) / max(1, len(cpu)), 3),
            "processes_per_box": round(procs_per_box, 1), "boxes": len(rss), "window_s": window}


def bench_pool(runs: int = 7, work: Path | None = None) -> dict:
    from bench import summary

    from worktreebox.fleet import pool as P
    from worktreebox.host import Host

    runs = max(3, runs)
    work = Path(work or tempfile.mkdtemp(prefix="wtbox-bench-pool-"))
    base = Path(tempfile.mkdtemp(prefix="pool-", dir=work))
    home, repo = base / "home", base / "repo"
    repo.mkdir()
    for args in (["init", "-q", "-b", "main"], ["config", "user.email", "b@example.com"],
                 ["config", "user.name", "Bench"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True)
    (repo / "slow_server.py").write_text(SERVER)
    (repo / "wtbox.toml").write_text(TOML)
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(repo), "commit", "-qm", "bench"], check=True)
    # its own port slice: other homes on this machine (test suites) lease from the default range;
    # below the kernel's ephemeral range (32768-60999 here), where a connection's own port can
    # take a service's before it binds (bench_fork's slices are 31000-32599)
    import random

    lo = 29000 + random.randrange(10) * 200
    env = {**os.environ, "WTBOX_HOME": str(home), "WTBOX_NO_AUTO_GC": "1", "WTBOX_PORT_RANGE": f"{lo}-{lo + 199}"}
    os.environ.update({k: env[k] for k in ("WTBOX_HOME", "WTBOX_PORT_RANGE")})
    host = Host(home)
    # No filler during the measurement (the pool is filled here, by hand): a claim then measures
    # the claim, not a box being made next to it on 2 cores.
    host.registry.set_pool_size(str(repo), 0)
    try:
        t = P.resolve_target(repo)
        P.top_up(host, t, runs)
        idle = _idle_cost(host, [b.id for b in P.pool_boxes(host)])
        ls_t, pooled_t, claim_ms = [], [], []
        for i in range(runs):
            ls_t.append(_until_answers(env, "ls")[0])
            s, rows = _until_answers(env, "new", f"warm-{i}", "--repo", str(repo))
            assert rows[0]["from_pool"], rows[0]
            pooled_t.append(s)
            claim_ms.append((rows[0]["timings"]["total"]) * 1000)
        fresh_t = []
        for i in range(3):
            s, rows = _until_answers(env, "new", f"cold-{i}", "--repo", str(repo), "--no-pool")
            assert not rows[0]["from_pool"]
            fresh_t.append(s)
        for b in host.list():
            host.rm(b, force=True)
        fan_t = []
        for i in range(2):
            P.top_up(host, t, FANOUT_N)
            s, rows = _until_answers(env, "fanout", f"fan{i}", "-n", str(FANOUT_N), "--repo", str(repo))
            assert all(r["from_pool"] for r in rows), rows
            fan_t.append(s)
            for b in host.list():
                host.rm(b, force=True)
        out = {"service_start_s": SLOW_START,
               "wtbox_ls": summary(ls_t),
               "new_from_pool_until_answers": summary(pooled_t),
               "claim_in_process_p50_ms": round(sorted(claim_ms)[len(claim_ms) // 2], 1),
               "new_no_pool_until_answers": summary(fresh_t),
               f"fanout_{FANOUT_N}_from_pool_until_all_answer": summary(fan_t),
               "idle_per_pooled_box": idle}
        p50 = out["new_from_pool_until_answers"]["p50_ms"]
        out["pool_vs_no_pool_ratio"] = round(p50 / out["new_no_pool_until_answers"]["p50_ms"], 3)
        out["pool_vs_ls_ratio"] = round(p50 / out["wtbox_ls"]["p50_ms"], 2)
        out["new_ok"] = p50 <= 150
        out["fanout_ok"] = out[f"fanout_{FANOUT_N}_from_pool_until_all_answer"]["p50_ms"] <= 500
        return out
    finally:
        from bench import remove_boxes

        remove_boxes(host)
        host.registry.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    a = ap.parse_args()
    print(json.dumps(bench_pool(a.runs), indent=2))
