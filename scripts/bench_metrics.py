#!/usr/bin/env python3
"""Benchmarks of per-box observability; scripts/bench.py imports bench_metrics().

    .venv/bin/python scripts/bench_metrics.py [--runs 10] [--boxes 20]
"""
from __future__ import annotations

import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

MB = 1024 * 1024
IDLE_SERVICE = '[services.idle]\ncmd = "sleep 1000000"\n'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ms(values: list[float]) -> dict:
    v = sorted(values)
    return {"p50_ms": round(statistics.median(v) * 1000, 1), "p90_ms": round(v[int(0.9 * (len(v) - 1))] * 1000, 1),
            "n": len(v)}


def _memory(pid: int) -> dict:
    """RSS, plus USS/PSS: the VictoriaMetrics binary's text pages are shared between boxes."""
    import psutil

    m = psutil.Process(pid).memory_full_info()
    return {"rss": m.rss, "uss": m.uss, "pss": m.pss}


def _repo(work: Path, files: int) -> Path:
    """The shared generated repo of bench.py (never modified: configs go in through Host.new(config=))."""
    from bench import build_repo

    return build_repo(work / "bench-repo", files=files) if files else _tiny_repo(work / "tiny-repo")


def _config(toml: str):
    from worktreebox.config.load import parse_repo_config

    return parse_repo_config(toml, "bench_metrics")


def _tiny_repo(dest: Path) -> Path:
    from bench import git

    if not dest.exists():
        dest.mkdir(parents=True)
        git(dest, "init", "-q", "-b", "main")
        git(dest, "config", "user.email", "bench@example.com")
        git(dest, "config", "user.name", "bench")
        (dest / "README.md").write_text("bench\n")
        git(dest, "add", "-A")
        git(dest, "commit", "-q", "-m", "init")
    return dest


def bench_vm(runs: int) -> dict:
    """Start → /health and SIGTERM → exit of a bare VictoriaMetrics, and its idle memory."""
    from worktreebox.providers.metrics import native as vm
    from worktreebox.telemetry.exposition import exposition
    from worktreebox.telemetry.vmclient import Client

    starts, stops = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            d = Path(tmp) / str(i)
            t = time.perf_counter()
            vm.start(f"bench-{i:08x}", port=_free_port(), data_dir=d / "metrics", run_dir=d / "run")
            starts.append(time.perf_counter() - t)
            t = time.perf_counter()
            vm.stop(f"bench-{i:08x}", run_dir=d / "run")
            stops.append(time.perf_counter() - t)
        d = Path(tmp) / "idle"
        port = _free_port()
        pid = vm.start("bench-1d1e0000", port=port, data_dir=d / "metrics", run_dir=d / "run")
        client = Client(f"http://127.0.0.1:{port}")
        # A box's worth of data: wtbox's own series for 3 services and one probe histogram.
        client.push_prometheus(exposition([(n, {"box": "b", "service": f"s{k}"}, 1.0) for n in
                                              ("wtbox_service_up", "wtbox_process_cpu_seconds_total",
                                               "wtbox_process_resident_memory_bytes") for k in range(3)]))
        client.query("wtbox_service_up")
        time.sleep(5)
        mem = _memory(pid)
        vm.stop("bench-1d1e0000", run_dir=d / "run")
    return {"vm_start_to_healthy": _ms(starts), "vm_stop": _ms(stops),
            "vm_idle_rss_mb": round(mem["rss"] / MB, 1), "vm_idle_uss_mb": round(mem["uss"] / MB, 1)}


def bench_new_overhead(runs: int, work: Path, files: int) -> dict:
    """`new` with observability on versus off (same repo, no database, no services), alternating.

    The wall-clock difference is noisy on a busy host, so each run also times the resources that
    `new` creates in parallel: the figure that matters is how much longer `metrics` takes than
    the slowest of the others (it hides behind the checkout)."""
    from worktreebox.host import Host

    base = '[database]\nmode = "none"\n'
    repo = _repo(work, files)
    on_cfg, off_cfg = _config(base), _config(base + "[observability]\nenabled = false\n")
    on, off, over, metrics_create = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        host = Host(Path(tmp) / "home")
        took: dict[str, float] = {}
        for r in host.resources:
            r.create = _timed(r.name, r.create, took)
        for _ in range(runs):
            for cfg, out in ((off_cfg, off), (on_cfg, on)):
                took.clear()
                t = time.perf_counter()
                box = host.new("bench", repo=repo, config=cfg)
                out.append(time.perf_counter() - t)
                host.rm(box.id, force=True)
            parallel = {r.name for r in host.resources if r.parallel}
            others = max(v for k, v in took.items() if k in parallel and k != "metrics")
            over.append(took["metrics"] - others)
            metrics_create.append(took["metrics"])
    return {"new_obs_off": _ms(off), "new_obs_on": _ms(on),
            "wall_extra_ms": round((statistics.median(on) - statistics.median(off)) * 1000, 1),
            "metrics_create": _ms(metrics_create),
            "metrics_over_slowest_other_ms": round(statistics.median(over) * 1000, 1)}


def _timed(name: str, fn, took: dict):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            took[name] = time.perf_counter() - t

    return wrapper


def bench_idle_boxes(n: int, work: Path, idle: float = 12.0) -> dict:
    """RSS of wtbox's part (supervisor + VictoriaMetrics) in n idle boxes with observability on."""
    from worktreebox.host import Host
    from worktreebox.providers.metrics import native as vm
    from worktreebox.services.client import supervisor_pid

    repo, cfg = _repo(work, 0), _config('[database]\nmode = "none"\n' + IDLE_SERVICE)
    vm_mem, sup_mem = [], []
    with tempfile.TemporaryDirectory() as tmp:
        host = Host(Path(tmp) / "home")
        boxes = []
        try:
            for _ in range(n):
                boxes.append(host.new("idle", repo=repo, config=cfg))
            time.sleep(idle)  # two collector ticks
            for box in boxes:
                vm_pid = int((box.run_dir / vm.PID_FILE).read_text())
                vm_mem.append(_memory(vm_pid))
                sup_mem.append(_memory(supervisor_pid(box)))
        finally:
            for box in boxes:
                host.rm(box.id, force=True)

    def per_box(key: str, mems: list[dict]) -> float:
        return round(sum(m[key] for m in mems) / len(mems) / MB, 1)

    return {
        "boxes": n,
        "vm_rss_mb_per_box": per_box("rss", vm_mem), "supervisor_rss_mb_per_box": per_box("rss", sup_mem),
        "wtbox_rss_mb_per_box": round(per_box("rss", vm_mem) + per_box("rss", sup_mem), 1),
        "wtbox_pss_mb_per_box": round(per_box("pss", vm_mem) + per_box("pss", sup_mem), 1),
        "total_rss_mb": round(sum(m["rss"] for m in vm_mem + sup_mem) / MB, 1),
        "total_pss_mb": round(sum(m["pss"] for m in vm_mem + sup_mem) / MB, 1),
    }


def bench_metrics(runs: int = 10, work: Path | None = None, boxes: int = 20) -> dict:
    work = work or ROOT / ".bench"
    work.mkdir(parents=True, exist_ok=True)
    out = bench_vm(runs)
    for label, files in (("3500_file_repo", 3500), ("tiny_repo", 0)):
        res = bench_new_overhead(runs if not files else max(3, runs // 2), work, files)
        out.update({f"{k}_{label}": v for k, v in res.items()})
    out["idle_boxes"] = bench_idle_boxes(boxes, work)
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--boxes", type=int, default=20)
    args = ap.parse_args()
    print(json.dumps(bench_metrics(args.runs, boxes=args.boxes), indent=2))
