"""Services figures for scripts/bench.py: supervisor overhead, time to ready, log queries.

- supervisor RSS and CPU over an idle window (30 s; `idle_seconds` or WTBOX_BENCH_IDLE for a quick run);
- `new` until all services are ready, minus the app's own start time (the same command run
  directly, polled until its URL answers) and minus `new` of the same repo without services;
- `wtbox logs --grep` (the CLI, start-up included) and `read_records(tail=100)` over a 200 MB log.

Standalone: .venv/bin/python scripts/bench_services.py [--idle 5] [--runs 3]
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PY = sys.executable
TOML = """
[database]
mode = "none"
[observability]
enabled = false
[box]
ports = ["web"]

[services.web]
cmd = "{py} -m http.server {{{{ ports.web }}}} --bind 127.0.0.1"
ready = "http://127.0.0.1:{{{{ ports.web }}}}/"

[services.worker]
cmd = "while true; do echo INFO tick; sleep 5; done"
"""


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def _repo(dest: Path, toml: str) -> Path:
    dest.mkdir(parents=True)
    _git(dest, "init", "-q", "-b", "main")
    (dest / "wtbox.toml").write_text(toml)
    (dest / "README.md").write_text("bench\n")
    _git(dest, "add", "-A")
    _git(dest, "-c", "user.email=b@e", "-c", "user.name=b", "commit", "-qm", "init")
    return dest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _app_start_time(env: dict | None = None, cwd: Path | None = None) -> float:
    """The app alone (in a fresh box's env, so caches start as cold): spawn it, poll its URL every 5 ms."""
    port = _free_port()
    t0 = time.perf_counter()
    p = subprocess.Popen([PY, "-m", "http.server", str(port), "--bind", "127.0.0.1"], env=env, cwd=cwd,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()
                return time.perf_counter() - t0
            except OSError:
                time.sleep(0.005)
    finally:
        p.terminate()
        p.wait()


def _ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 1)


def _big_log(logs_dir: Path, mb: int) -> None:
    logs_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(5000):
        level = "error" if i % 997 == 0 else "warning" if i % 101 == 0 else "info"
        lines.append(json.dumps({"ts": "TS", "service": "big", "stream": "stdout", "level": level,
                                 "msg": f"GET /api/items/{i} 200 in {i % 50}ms user=u{i % 1000} req={i:08x}"}))
    block = "\n".join(lines) + "\n"
    with open(logs_dir / "big.jsonl", "w") as f:
        n = 0
        while f.tell() < mb * 1024 * 1024:
            f.write(block.replace('"TS"', f'"2026-01-01T{n // 3600 % 24:02d}:{n // 60 % 60:02d}:{n % 60:02d}.000Z"'))
            n += 1


def bench_services(runs: int = 3, work: Path | None = None, idle_seconds: float | None = None,
                   log_mb: int = 200) -> dict:
    import psutil

    from worktreebox.host import Host
    from worktreebox.services.client import services_status, supervisor_pid
    from worktreebox.telemetry.logs.reader import read_records

    if idle_seconds is None:
        idle_seconds = float(os.environ.get("WTBOX_BENCH_IDLE", "30"))
    runs = max(1, min(runs, 5))
    tmp = Path(tempfile.mkdtemp(prefix="wtbox-bench-svc-", dir=work))
    env_before = os.environ.get("WTBOX_HOME")
    os.environ["WTBOX_HOME"] = str(tmp / "home")
    host = Host(tmp / "home")
    out: dict = {}
    try:
        repo = _repo(tmp / "repo", TOML.format(py=PY))
        app_bare = [_app_start_time() for _ in range(runs)]
        app, new_svc, new_plain, ready, overhead = [], [], [], [], []
        box = None
        for i in range(runs):
            t0 = time.perf_counter()
            b = host.new(f"plain{i}", repo=repo, start_services=False)
            new_plain.append(time.perf_counter() - t0)
            app.append(_app_start_time(host.exec_env(b), b.path))
            host.rm(b.id, force=True)
            t0 = time.perf_counter()
            b = host.new(f"svc{i}", repo=repo)
            new_svc.append(time.perf_counter() - t0)
            ready.append(max(s["ready_seconds"] or 0 for s in services_status(b).values()))
            # This run's own decomposition: robust against a busy machine changing the app's start time.
            overhead.append(new_svc[-1] - new_plain[-1] - ready[-1])
            if i < runs - 1:
                host.rm(b.id, force=True)
            else:
                box = b
        out["app_start_outside_box_ms"] = _ms(app_bare)
        out["app_start_ms"] = _ms(app)  # in a fresh box's env: what the supervisor's start really waits for
        out["new_no_services_ms"] = _ms(new_plain)
        out["new_until_all_ready_ms"] = _ms(new_svc)
        out["new_minus_app_start_ms"] = round(out["new_until_all_ready_ms"] - out["app_start_ms"], 1)
        out["services_overhead_ms"] = round(out["new_minus_app_start_ms"] - out["new_no_services_ms"], 1)
        out["ready_seconds_seen_by_supervisor_ms"] = _ms(ready)
        out["services_overhead_per_run_ms"] = _ms(overhead)  # new - new without services - app ready time

        pid = supervisor_pid(box)
        sup = psutil.Process(pid)
        time.sleep(1.0)  # let start-up work settle before the idle window
        c0, t0 = sup.cpu_times(), time.perf_counter()
        time.sleep(idle_seconds)
        c1, t1 = sup.cpu_times(), time.perf_counter()
        cpu = (c1.user - c0.user + c1.system - c0.system) / (t1 - t0)
        out["supervisor_idle_window_s"] = idle_seconds
        out["supervisor_rss_mb"] = round(sup.memory_info().rss / 2**20, 1)
        out["supervisor_uss_mb"] = round(sup.memory_full_info().uss / 2**20, 1)
        out["supervisor_idle_cpu_percent"] = round(cpu * 100, 3)
        out["supervisor_threads"] = sup.num_threads()
        t0 = time.perf_counter()
        host.rm(box.id, force=True)
        out["rm_with_services_ms"] = round((time.perf_counter() - t0) * 1000, 1)

        # Log queries over a big log of a box made for it (no services; only its logs dir matters).
        b = host.new("logs", repo=repo, start_services=False)
        t0 = time.perf_counter()
        _big_log(b.logs_dir, log_mb)
        out["log_file_mb"] = round((b.logs_dir / "big.jsonl").stat().st_size / 2**20, 1)
        out["log_generate_s"] = round(time.perf_counter() - t0, 2)
        cli = [PY, "-m", "worktreebox.cli.main", "logs", b.id, "--json"]
        for name, args in (("logs_grep_rare_cli", ["--grep", "req=00000ff1"]),
                           ("logs_grep_regex_cli", ["--grep", r"user=u99\d\b", "--level", "error"]),
                           ("logs_tail100_grep_cli", ["--grep", "items/42", "--tail", "100"])):
            t0 = time.perf_counter()
            p = subprocess.run(cli + args, capture_output=True, text=True, env=os.environ.copy())
            took = time.perf_counter() - t0
            if p.returncode != 0:
                raise RuntimeError(p.stderr.strip())
            out[name] = {"ms": round(took * 1000, 1), "records": len(p.stdout.splitlines())}
        for name, kw in (("read_tail100_ms", {"tail": 100}),
                         ("read_tail100_error_ms", {"tail": 100, "min_level": "error"}),
                         ("read_grep_full_scan_ms", {"grep": "req=00000ff1"})):
            t0 = time.perf_counter()
            read_records(b.logs_dir, **kw)
            out[name] = round((time.perf_counter() - t0) * 1000, 1)
        out["tail100_under_1s"] = out["read_tail100_error_ms"] < 1000 and out["logs_tail100_grep_cli"]["ms"] < 1000
        host.rm(b.id, force=True)
    finally:
        for b in host.list():
            try:
                host.rm(b.id, force=True)
            except Exception:
                pass
        host.registry.close()
        if env_before is None:
            os.environ.pop("WTBOX_HOME", None)
        else:
            os.environ["WTBOX_HOME"] = env_before
        shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--idle", type=float, default=None, help="idle window in seconds (default 30)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--log-mb", type=int, default=200)
    a = ap.parse_args()
    print(json.dumps(bench_services(a.runs, idle_seconds=a.idle, log_mb=a.log_mb), indent=2))
