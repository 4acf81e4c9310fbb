#!/usr/bin/env python3
"""Benchmarks for worktreebox: prints a table, or one JSON document with --json.

Each figure is measured against its raw floor in the same run (e.g. `wtbox new` versus a
plain `git worktree add` of the same repo), so ratios hold on any machine.

    .venv/bin/python scripts/bench.py            # everything available
    .venv/bin/python scripts/bench.py --only core --runs 10 --json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
PY = sys.executable
CORE_TOML = '[database]\nmode = "none"\n[observability]\nenabled = false\n'


def pct(values: list[float], p: float) -> float:
    v = sorted(values)
    k = (len(v) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summary(values: list[float]) -> dict:
    return {"p50_ms": round(pct(values, 0.5) * 1000, 1), "p90_ms": round(pct(values, 0.9) * 1000, 1),
            "n": len(values)}


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def build_repo(dest: Path, files: int = 3500, total_mb: float = 42.0) -> Path:
    """A generated repo of realistic size: nested packages of Python-like text files."""
    marker = dest / ".bench-complete"
    if marker.exists():
        return dest
    if dest.exists():
        subprocess.run(["rm", "-rf", str(dest)], check=True)
    dest.mkdir(parents=True)
    rng = random.Random(42)
    words = ["def", "class", "return", "self", "value", "items", "request", "response", "cache", "port",
             "database", "schema", "worker", "config", "import", "from", "yield", "async", "await", "None"]
    per_file = int(total_mb * 1e6 / files)
    for i in range(files):
        d = dest / f"pkg{i % 37}" / f"mod{i % 11}"
        d.mkdir(parents=True, exist_ok=True)
        lines, size = [], 0
        while size < per_file:
            words_here = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
            line = f"    {words_here}  # {rng.random():.12f}\n"
            lines.append(line)
            size += len(line)
        (d / f"file{i}.py").write_text("".join(lines))
    (dest / "wtbox.toml").write_text(CORE_TOML)
    git(dest, "init", "-q", "-b", "main")
    git(dest, "-c", "user.email=b@e", "-c", "user.name=b", "add", "-A")
    git(dest, "-c", "user.email=b@e", "-c", "user.name=b", "commit", "-qm", "bench")
    marker.write_text("ok")
    (dest / ".git" / "info" / "exclude").write_text(".bench-complete\n")
    return dest


def wtbox(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WTBOX_HOME": str(home), "WTBOX_NO_AUTO_GC": "1"}
    proc = subprocess.run([PY, "-m", "worktreebox.cli.main", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"wtbox {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def remove_boxes(host) -> list[str]:
    """Remove every box of `host`, going on past one that fails: what a bench's clean-up does, also
    after a run that ended early. Returns what failed, one line per box."""
    failed = []
    for b in host.list():
        try:
            host.rm(b.id, force=True)
        except Exception as e:
            failed.append(f"could not remove {b.id}: {e}")
    return failed


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_core(runs: int, work: Path) -> dict:
    repo = build_repo(work / "bench-repo")
    nfiles = int(subprocess.run(["git", "-C", str(repo), "ls-files"], capture_output=True, text=True)
                 .stdout.count("\n"))
    size_mb = sum(p.stat().st_size for p in repo.rglob("*") if p.is_file() and ".git" not in p.parts) / 1e6
    home = Path(tempfile.mkdtemp(prefix="wtbox-bench-", dir=work))
    raw_add, raw_rm, new_t, rm_t, ls_t = [], [], [], [], []
    for i in range(runs):
        path = work / f"raw-{i}"
        t, _ = timed(lambda: git(repo, "worktree", "add", "-q", "-b", f"raw-{i}", str(path), "HEAD"))  # noqa: B023 (called before the loop moves on)
        raw_add.append(t)
        t, _ = timed(lambda: (git(repo, "worktree", "remove", "--force", str(path)),  # noqa: B023 (called before the loop moves on)
                              git(repo, "branch", "-D", f"raw-{i}")))  # noqa: B023 (called before the loop moves on)
        raw_rm.append(t)
        t, proc = timed(lambda: wtbox(home, "new", f"bench-{i}", "--repo", str(repo), "--json"))  # noqa: B023 (called before the loop moves on)
        new_t.append(t)
        box_id = json.loads(proc.stdout)["id"]
        t, _ = timed(lambda: wtbox(home, "ls"))
        ls_t.append(t)
        t, _ = timed(lambda: wtbox(home, "rm", box_id))  # noqa: B023 (called before the loop moves on)
        rm_t.append(t)
    subprocess.run(["rm", "-rf", str(home)])
    out = {
        "repo": {"files": nfiles, "mb": round(size_mb, 1)},
        "raw_worktree_add": summary(raw_add), "wtbox_new": summary(new_t),
        "raw_worktree_remove": summary(raw_rm), "wtbox_rm": summary(rm_t), "wtbox_ls": summary(ls_t),
    }
    out["new_target_ms"] = round(1.3 * out["raw_worktree_add"]["p50_ms"] + 100, 1)
    out["rm_target_ms"] = round(1.3 * out["raw_worktree_remove"]["p50_ms"] + 100, 1)
    out["new_ratio"] = round(out["wtbox_new"]["p50_ms"] / out["raw_worktree_add"]["p50_ms"], 2)
    out["rm_ratio"] = round(out["wtbox_rm"]["p50_ms"] / out["raw_worktree_remove"]["p50_ms"], 2)
    out["new_ok"] = out["wtbox_new"]["p50_ms"] <= out["new_target_ms"]
    out["rm_ok"] = out["wtbox_rm"]["p50_ms"] <= out["rm_target_ms"]
    out["ls_ok"] = out["wtbox_ls"]["p50_ms"] <= 150
    return out


SECTIONS = {"core": bench_core}


def _optional_sections() -> None:
    """Benchmarks of the other resources live in their own modules (scripts/bench_*.py)."""
    for name, mod, fn in (("database", "bench_db", "bench_database"), ("services", "bench_services", "bench_services"),
                          ("metrics", "bench_metrics", "bench_metrics"), ("fanout", "bench_fanout", "bench_fanout"),
                          ("gc", "bench_gc", "bench_gc"), ("docker", "bench_docker", "bench_docker"),
                          ("pool", "bench_pool", "bench_pool"), ("mcp", "bench_mcp", "bench_mcp"),
                          ("traces", "bench_traces", "bench_traces"),
                          ("browser", "bench_browser", "bench_browser"),
                          ("cgroups", "bench_cgroups", "bench_cgroups"), ("layers", "bench_layers", "bench_layers"),
                          ("router", "bench_router", "bench_router"),
                          ("sandbox", "bench_box_sandbox", "bench_sandbox"),
                          ("sandbox_parts", "bench_sandbox", "bench_sandbox_parts"),
                          ("backing", "bench_backing", "bench_backing"), ("fork", "bench_fork", "bench_fork"),
                          ("scale", "bench_scale", "bench_scale")):
        try:
            module = __import__(mod)
            SECTIONS[name] = getattr(module, fn)
        except (ImportError, AttributeError):
            pass


# Sections that take their homes' spare sandboxes away themselves (`gc --spares`); the others run with
# none (as the test suite does): a spare outlives its home's boxes by design, for up to its ttl.
SPARE_AWARE = {"sandbox", "backing", "docker", "layers", "fork", "scale"}


@contextlib.contextmanager
def _spares_for(section: str) -> Iterator[None]:
    if section in SPARE_AWARE or "WTBOX_SANDBOX_SPARES" in os.environ:
        yield
        return
    os.environ["WTBOX_SANDBOX_SPARES"] = "0"
    try:
        yield
    finally:
        os.environ.pop("WTBOX_SANDBOX_SPARES", None)


def print_table(results: dict) -> None:
    for section, data in results.items():
        print(f"\n== {section}")
        _print_rows(data, "  ")


def _print_rows(data: dict, indent: str) -> None:
    for key, val in data.items():
        if isinstance(val, dict) and "p50_ms" in val:
            print(f"{indent}{key:<32} p50 {val['p50_ms']:>9.1f} ms   p90 {val['p90_ms']:>9.1f} ms   (n={val['n']})")
        elif isinstance(val, dict) and any(isinstance(v, dict) for v in val.values()):
            print(f"{indent}{key}:")  # a sub-section (e.g. layers' default and checkout_fallback)
            _print_rows(val, indent + "  ")
        else:
            print(f"{indent}{key:<32} {json.dumps(val)}")


def main() -> None:
    _optional_sections()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--only", action="append", choices=sorted(SECTIONS), help="run only these sections")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--work", type=Path, default=ROOT / ".bench",
                    help="scratch dir (the generated repo is cached here)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.only or list(SECTIONS):
        fn = SECTIONS[name]
        print(f"bench: {name} ...", file=sys.stderr)
        try:
            with _spares_for(name):
                results[name] = fn(args.runs, args.work) if name == "core" else _call(fn, args)
        except Exception as e:  # one section failing must not hide the others
            results[name] = {"error": f"{type(e).__name__}: {e}"}
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)


def _call(fn, args):
    import inspect

    params = inspect.signature(fn).parameters
    kwargs = {}
    if "runs" in params:
        kwargs["runs"] = args.runs
    if "work" in params:
        kwargs["work"] = args.work
    return fn(**kwargs)


if __name__ == "__main__":
    main()
