#!/usr/bin/env python3
"""Benchmarks of `wtbox browse`; scripts/bench.py imports bench_browser() (`--only browser`).

    .venv/bin/python scripts/bench_browser.py [--runs 5]

- `browse --screenshot` wall time of a simple page, cold (no [browser]: Chromium starts and stops
  for the command) and warm ([browser] enabled: the box's running Chromium), each as the whole CLI
  command; the floor is Chromium's own one-shot `--headless --screenshot` of the same page (a start,
  one load, one PNG, an exit), measured in the same run.
- Chromium's memory per box: RSS, PSS and USS summed over its processes, idle after one browse.
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
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
MB = 1024 * 1024

PAGE_APP = '''
import http.server, os
PAGE = b"<!doctype html><title>bench</title><h1 style='color:#036'>hello</h1><p>a simple page</p>"
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/" else 404)
        self.send_header("Content-Type", "text/html"); self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers(); self.wfile.write(PAGE)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
'''


def _ms(values: list[float]) -> dict:
    v = sorted(values)
    return {"p50_ms": round(statistics.median(v) * 1000, 1), "p90_ms": round(v[int(0.9 * (len(v) - 1))] * 1000, 1),
            "n": len(v)}


def _toml(browser: bool) -> str:
    return ('[box]\nports = ["web"]\n[database]\nmode = "none"\n[observability]\nenabled = false\n'
            f'[services.web]\ncmd = "{sys.executable} app.py"\nready = "http://127.0.0.1:{{{{ ports.web }}}}/"\n'
            + ("[browser]\nenabled = true\n" if browser else ""))


def _repo(dest: Path) -> Path:
    from bench import git

    if not dest.exists():
        dest.mkdir(parents=True)
        (dest / "app.py").write_text(PAGE_APP)
        git(dest, "init", "-q", "-b", "main")
        git(dest, "-c", "user.email=b@e", "-c", "user.name=b", "add", "-A")
        git(dest, "-c", "user.email=b@e", "-c", "user.name=b", "commit", "-qm", "bench page")
    return dest


def _wtbox(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WTBOX_HOME": str(home), "WTBOX_NO_AUTO_GC": "1"}
    proc = subprocess.run([sys.executable, "-m", "worktreebox.cli.main", *args], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"wtbox {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def _raw_screenshot(url: str, out: Path, profile: Path) -> None:
    """Chromium's own one-shot screenshot: the floor of "start a browser, load, write a PNG"."""
    from worktreebox.telemetry import browser

    # The same flags as a box's Chromium, minus the DevTools server and the no-tab start (--screenshot needs a tab).
    flags = [f for f in browser.FLAGS if not f.startswith("--remote-debugging") and f != "--no-startup-window"]
    cmd = [browser.find_chromium(), *flags,
           f"--user-data-dir={profile}", "--window-size=1280,800", f"--screenshot={out}", url]
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=60)
    if not out.exists():
        raise RuntimeError("chromium --screenshot wrote no file")


def bench_browser(runs: int = 5, work: Path | None = None) -> dict:
    from worktreebox.config.load import parse_repo_config
    from worktreebox.host import Host
    from worktreebox.telemetry import browser

    runs = max(3, min(runs, 10))  # every cold run starts a Chromium (~1 s here)
    work = work or ROOT / ".bench"
    work.mkdir(parents=True, exist_ok=True)
    repo = _repo(work / "browser-page-repo")
    home = Path(tempfile.mkdtemp(prefix="wtbox-bench-browser-", dir=work))
    # Above the slices test homes lease from (20000-29999), below the ephemeral range: a cold browse
    # leases and frees a port every run, and another home grabbing it in between would end the run.
    os.environ.setdefault("WTBOX_PORT_RANGE", "30000-30999")
    host = Host(home)
    out: dict = {}
    try:
        cold = host.new("bench-cold", repo=repo, config=parse_repo_config(_toml(False), "bench_browser"))
        warm = host.new("bench-warm", repo=repo, config=parse_repo_config(_toml(True), "bench_browser"))
        url = f"http://127.0.0.1:{cold.ports['web']}/"
        shots = home / "shots"
        shots.mkdir()
        raw, cold_t, warm_t = [], [], []
        _raw_screenshot(url, shots / "warmup.png", home / "raw-profile")  # page cache, fontconfig
        for i in range(runs):
            t = time.perf_counter()
            _raw_screenshot(url, shots / f"raw-{i}.png", home / "raw-profile")
            raw.append(time.perf_counter() - t)
            t = time.perf_counter()
            _wtbox(home, "browse", cold.id, "/", "--screenshot", str(shots / f"cold-{i}.png"), "--json")
            cold_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            _wtbox(home, "browse", warm.id, "/", "--screenshot", str(shots / f"warm-{i}.png"), "--json")
            warm_t.append(time.perf_counter() - t)
        out["raw_chromium_screenshot"] = _ms(raw)
        out["browse_cold"] = _ms(cold_t)
        out["browse_warm"] = _ms(warm_t)
        floor = out["raw_chromium_screenshot"]["p50_ms"]
        out["cold_ratio"] = round(out["browse_cold"]["p50_ms"] / floor, 2)
        out["warm_ratio"] = round(out["browse_warm"]["p50_ms"] / floor, 2)
        out["warm_saves_ms"] = round(out["browse_cold"]["p50_ms"] - out["browse_warm"]["p50_ms"], 1)
        time.sleep(2)  # let the renderer of the last page go away: the idle figure is what a box costs
        mem = browser.memory(warm.id, warm.dir)
        procs = len(browser.find_processes(warm.id, warm.dir))
        out["chromium_per_box"] = {"rss_mb": round(mem["rss_bytes"] / MB, 1), "pss_mb": round(mem["pss_bytes"] / MB, 1),
                                   "uss_mb": round(mem["uss_bytes"] / MB, 1), "processes": procs}
        out["cold_leaves_no_chromium"] = browser.find_processes(cold.id, cold.dir) == []
    finally:
        from bench import remove_boxes

        for line in remove_boxes(host):  # report, keep cleaning
            print(f"bench_browser: {line}", file=sys.stderr)
        host.registry.close()
        shutil.rmtree(home, ignore_errors=True)
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    print(json.dumps(bench_browser(args.runs), indent=2))
