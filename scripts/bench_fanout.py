#!/usr/bin/env python3
"""Benchmark of `wtbox fanout`; scripts/bench.py imports bench_fanout().

Wall time from the start of `wtbox fanout -n 5` until all five boxes are ready (database and
observability on when this host has them, a service per box, no --run), against a single
`wtbox new` of the same repo measured in the same run (target: ≤ 2 × a single new on 2 cores),
and the peak RSS of the wtbox process and its children, sampled while it runs.

    .venv/bin/python scripts/bench_fanout.py [--runs 3]
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
PY = sys.executable
MB = 1024 * 1024
N = 5

SERVER = """\
import http.server
import sys


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


def _toml(database: bool, observability: bool) -> str:
    return (f'[box]\nports = ["web"]\n\n[database]\nmode = "{"schema" if database else "none"}"\n\n'
            f'[observability]\nenabled = {"true" if observability else "false"}\n\n'
            f'[services.web]\ncmd = "{PY} bench_server.py {{{{ ports.web }}}}"\n'
            'ready = "http://127.0.0.1:{{ ports.web }}/"\n')


def _database_available() -> bool:
    if os.environ.get("WTBOX_POSTGRES_URL"):
        return True
    try:
        from worktreebox.providers.postgres.embedded import find_bin_dir

        find_bin_dir()
        return True
    except Exception:
        return False


def _repo(work: Path, database: bool, observability: bool) -> Path:
    """bench.py's generated repo (its own copy: we commit a wtbox.toml with a service into it)."""
    from bench import build_repo, git

    dest = work / "bench-fanout-repo"
    toml = _toml(database, observability)
    build_repo(dest)
    if (dest / "wtbox.toml").read_text() != toml:
        (dest / "wtbox.toml").write_text(toml)
        (dest / "bench_server.py").write_text(SERVER)
        git(dest, "-c", "user.email=b@e", "-c", "user.name=b", "add", "wtbox.toml", "bench_server.py")
        git(dest, "-c", "user.email=b@e", "-c", "user.name=b", "commit", "-qm", "fanout bench config")
    return dest


class _RssSampler:
    """Peak of the summed RSS of a process and all its descendants, sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            total = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for p in procs:
                try:
                    total += p.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(0.02)


def _wtbox(home: Path, *args: str, sampler: bool = False) -> tuple[float, str, int]:
    env = {**os.environ, "WTBOX_HOME": str(home), "WTBOX_NO_AUTO_GC": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([PY, "-m", "worktreebox.cli.main", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)
    peak = 0
    if sampler:
        with _RssSampler(proc.pid) as s:
            out, err = proc.communicate()
        peak = s.peak
    else:
        out, err = proc.communicate()
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"wtbox {' '.join(args)} failed: {err.strip()}")
    return took, out, peak


def _box_rss(home: Path) -> int:
    """RSS of everything the boxes run (supervisor, service, VictoriaMetrics): what N boxes cost at rest."""
    from worktreebox.host import Host
    from worktreebox.system import procs

    host = Host(home)
    total = 0
    for b in host.list():
        for p in procs.find_box_processes(b.id, b.dir):
            try:
                total += p.memory_info().rss
            except Exception:
                pass
    host.registry.close()
    return total


def _raw_checkouts(repo: Path, work: Path, n: int) -> float:
    """The floor under a fan-out: n plain `git worktree add` at once (then removed, untimed).

    Concurrent adds in one repo can fail transiently ("failed to read .git/worktrees/...");
    a failed one is retried, inside the timing, as wtbox itself does.
    """
    import secrets

    tag = secrets.token_hex(3)
    names = [f"raw-fanout-{tag}-{k}" for k in range(n)]
    paths = [work / name for name in names]

    def add(k: int) -> subprocess.Popen:
        has = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "-q", f"refs/heads/{names[k]}"],
                             capture_output=True).returncode == 0
        args = [str(paths[k]), names[k]] if has else ["-b", names[k], str(paths[k]), "HEAD"]
        return subprocess.Popen(["git", "-C", str(repo), "worktree", "add", "-q", *args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    t0 = time.perf_counter()
    pending = list(range(n))
    for _attempt in range(5):
        procs = {k: add(k) for k in pending}
        pending = [k for k, p in procs.items() if p.wait() != 0]
        if not pending:
            break
    took = time.perf_counter() - t0
    for name, p in zip(names, paths, strict=True):
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(p)], capture_output=True)
        subprocess.run(["git", "-C", str(repo), "branch", "-D", name], capture_output=True)
    if pending:
        raise RuntimeError("plain git worktree add failed")
    return took


def _ms(values: list[float]) -> dict:
    v = sorted(values)
    return {"p50_ms": round(statistics.median(v) * 1000, 1), "p90_ms": round(v[int(0.9 * (len(v) - 1))] * 1000, 1),
            "n": len(v)}


def bench_fanout(runs: int = 3, work: Path | None = None) -> dict:
    work = Path(work) if work else ROOT / ".bench"
    work.mkdir(parents=True, exist_ok=True)
    database = _database_available()
    observability = shutil.which("victoria-metrics") is not None
    repo = _repo(work, database, observability)
    home = Path(tempfile.mkdtemp(prefix="wtbox-bench-fanout-", dir=work))
    # Ports are leased per home: keep clear of other homes (test suites) that may run on this host now.
    (home / "config.toml").write_text('[host]\nport_range = "25000-25999"\n')
    fanout_t, new_t, peaks, box_rss, new_peaks = [], [], [], [], []
    failures: list[str] = []
    raw1_t: list[float] = []
    raw5_t: list[float] = []
    try:
        # Warm-up, untimed: initdb of the embedded cluster, compiled bytecode, page cache.
        _, out, _ = _wtbox(home, "new", "warm", "--repo", str(repo), "--json")
        _wtbox(home, "rm", "--force", json.loads(out)["id"])
        for i in range(runs):
            for _attempt in range(3):
                try:
                    t, out, peak = _wtbox(home, "new", f"one-{i}", "--repo", str(repo), "--json", sampler=True)
                    break
                except RuntimeError as e:
                    failures.append(str(e).splitlines()[0])
            else:
                raise RuntimeError(f"new run {i} failed 3 times: {failures[-1]}")
            new_t.append(t)
            new_peaks.append(peak)
            _wtbox(home, "rm", "--force", json.loads(out)["id"])
            for _attempt in range(3):
                t, out, peak = _wtbox(home, "fanout", f"five-{i}", "-n", str(N), "--repo", str(repo), "--json",
                                      sampler=True)
                errors = [r["error"] for r in json.loads(out) if r["box"] is None or r["error"]]
                if not errors:
                    break
                # Reported, not hidden: a box that failed to become ready makes the time meaningless.
                failures.append(errors[0].splitlines()[0])
                _wtbox(home, "rm", "--all", "--yes", "--force")
            else:
                raise RuntimeError(f"fanout run {i} failed 3 times: {failures[-1]}")
            fanout_t.append(t)
            raw1_t.append(_raw_checkouts(repo, work, 1))
            raw5_t.append(_raw_checkouts(repo, work, N))
            peaks.append(peak)
            box_rss.append(_box_rss(home))
            _wtbox(home, "rm", "--all", "--yes", "--force")
    finally:
        env = {**os.environ, "WTBOX_HOME": str(home), "WTBOX_NO_AUTO_GC": "1"}
        subprocess.run([PY, "-m", "worktreebox.cli.main", "rm", "--all", "--yes", "--force"], env=env,
                       capture_output=True, cwd=ROOT)
        if database and not os.environ.get("WTBOX_POSTGRES_URL"):
            subprocess.run([PY, "-m", "worktreebox.cli.main", "db", "stop"], env=env, capture_output=True, cwd=ROOT)
        shutil.rmtree(home, ignore_errors=True)
    fan, one = _ms(fanout_t), _ms(new_t)
    ratio = round(fan["p50_ms"] / one["p50_ms"], 2)
    return {
        "database": database, "observability": observability, "boxes": N,
        "fanout_5_until_ready": fan, "wtbox_new": one,
        "five_times_new_ms": round(N * one["p50_ms"], 1),
        "fanout_vs_new_ratio": ratio, "target_ratio": 2.0, "ok": ratio <= 2.0,
        "speedup_vs_5_sequential": round(N * one["p50_ms"] / fan["p50_ms"], 2),
        # The checkout floor on this machine right now: one, and five at once.
        "raw_worktree_add_1": _ms(raw1_t), "raw_worktree_add_5_parallel": _ms(raw5_t),
        "peak_rss_mb_fanout": round(max(peaks) / MB, 1), "peak_rss_mb_new": round(max(new_peaks) / MB, 1),
        "boxes_rss_mb_at_rest": round(statistics.median(box_rss) / MB, 1),
        "failures": failures,
    }


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=ROOT / ".bench")
    args = ap.parse_args()
    print(json.dumps(bench_fanout(args.runs, args.work), indent=2))
