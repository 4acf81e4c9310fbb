#!/usr/bin/env python3
"""Benchmark of copy-on-write boxes (trees per commit, dependency layers); scripts/bench.py imports
bench_layers().

On a generated Django-size repo (6,800 files, 71 MB) with a database per box (the default mode)
and observability on, no services, all figures are the whole CLI process (start-up included)
against their floor in the same run, each through the `wtbox` launcher both served by the CLI
server and in process (WTBOX_NO_SERVER=1), alternating:

- `new` p50 versus a plain `git worktree add` of the same repo (target <= 300 ms and <= 0.5x);
- `rm` p50 versus `git worktree remove --force` + `git branch -D` (target <= 300 ms);
- five `new` at once (wall) versus one `new` p50 (target <= 1.5x);
- the same `new`/`rm` with the plain-checkout fallback forced (WTBOX_MOUNTS=checkout), which must be
  no slower than a plain `git worktree add` plus what wtbox adds;
- a real dependency set (a uv.lock of >= 50 PyPI packages): the first box builds the layer, every
  later box gets its environment (`timings.deps` of `new --json`) in <= 200 ms;
- the disk each box costs (its own upper layer).

    env -u PYTHONDONTWRITEBYTECODE .venv/bin/python scripts/bench_layers.py [--runs 10] [--json]
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
PY = sys.executable

TOML = '[box]\nports = ["web"]\n\n[database]\nmode = "database"\n\n[observability]\nenabled = true\n'

# >= 50 packages once resolved (a typical web app's runtime + test dependencies).
DEPS_PYPROJECT = """\
[project]
name = "benchapp"
version = "0.1.0"
requires-python = ">=3.11"
dependencies = [
    "django>=4.2", "djangorestframework", "celery", "redis", "requests", "boto3", "pydantic",
    "sqlalchemy", "alembic", "psycopg[binary]", "jinja2", "click", "rich", "httpx", "pytest",
    "pytest-django", "factory-boy", "python-dateutil", "pyyaml", "gunicorn", "sentry-sdk", "structlog",
]

[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"
"""


def _ms(values: list[float]) -> dict:
    v = sorted(values)
    return {"p50_ms": round(statistics.median(v) * 1000, 1), "p90_ms": round(v[int(0.9 * (len(v) - 1))] * 1000, 1),
            "n": len(v)}


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def _commit(repo: Path, msg: str) -> None:
    _git(repo, "-c", "user.email=b@e", "-c", "user.name=b", "add", "-A")
    _git(repo, "-c", "user.email=b@e", "-c", "user.name=b", "commit", "-qm", msg)


def django_size_repo(work: Path) -> Path:
    """bench.py's generator at the size of Django's sdist, with this section's wtbox.toml committed."""
    from bench import build_repo

    dest = work / "bench-django-repo"
    build_repo(dest, files=6800, total_mb=71.0)
    if (dest / "wtbox.toml").read_text() != TOML:
        (dest / "wtbox.toml").write_text(TOML)
        _commit(dest, "layers bench config")
    return dest


def deps_repo(work: Path) -> Path:
    """A small app whose uv.lock (made once with the real uv against PyPI) pins >= 50 packages."""
    dest = work / "bench-deps-repo"
    marker = dest / ".bench-complete"
    if marker.exists():
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "src" / "benchapp").mkdir(parents=True)
    (dest / "pyproject.toml").write_text(DEPS_PYPROJECT)
    (dest / "src" / "benchapp" / "__init__.py").write_text("VALUE = 1\n")
    (dest / ".gitignore").write_text(".venv/\n.bench-complete\n")
    (dest / "wtbox.toml").write_text('[box]\nports = []\n[database]\nmode = "none"\n[observability]\nenabled = false\n')
    subprocess.run([_uv(), "lock", "--quiet"], cwd=dest, check=True)
    _git(dest, "init", "-q", "-b", "main")
    _commit(dest, "deps bench")
    marker.write_text("ok")
    return dest


def _uv() -> str:
    found = shutil.which("uv") or str(Path(PY).with_name("uv"))
    if not Path(found).exists():
        raise RuntimeError("uv is not installed")
    return found


def _locked_packages(repo: Path) -> int:
    import tomllib

    return len(tomllib.loads((repo / "uv.lock").read_text()).get("package", []))


# The `wtbox` command as users run it: the launcher, which hands served commands to the home's CLI
# server (README, "CLI server") unless WTBOX_NO_SERVER=1.
_SCRIPT = Path(PY).with_name("wtbox")
WTBOX = [str(_SCRIPT)] if _SCRIPT.exists() else [PY, "-m", "worktreebox.cli.launcher"]
MODES = ("in_process", "served")


class Home:
    def __init__(self, work: Path, **env: str) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="wtbox-bench-layers-", dir=work))
        self.env = {**os.environ, "WTBOX_HOME": str(self.path), "WTBOX_NO_AUTO_GC": "1", **env}
        self.env.pop("WTBOX_POSTGRES_URL", None)
        self.env.pop("WTBOX_NO_SERVER", None)

    def run(self, *args: str, served: bool = True) -> tuple[float, str]:
        env = self.env if served else {**self.env, "WTBOX_NO_SERVER": "1"}
        t0 = time.perf_counter()
        proc = subprocess.run([*WTBOX, *args], capture_output=True, text=True, env=env, cwd=ROOT)
        took = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"wtbox {' '.join(args)} failed: {proc.stderr.strip()}")
        return took, proc.stdout

    def new(self, task: str, repo: Path, served: bool = True) -> tuple[float, dict]:
        took, out = self.run("new", task, "--repo", str(repo), "--json", served=served)
        return took, json.loads(out)

    def server_up(self, timeout: float = 30.0) -> None:
        """Wait until the CLI server a served command started answers (it preloads for ~1 s)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, out = self.run("server", "status", "--json")
            if json.loads(out)["running"]:
                return
            self.run("ls")  # starts one if the last call found none
            time.sleep(0.2)
        raise RuntimeError("the CLI server did not start")

    def close(self) -> None:
        subprocess.run([*WTBOX, "server", "stop"], env=self.env, capture_output=True)
        subprocess.run([PY, "-m", "worktreebox.cli.main", "rm", "--all", "--yes", "--force"], env=self.env,
                       capture_output=True)
        subprocess.run([PY, "-m", "worktreebox.cli.main", "gc", "--grace", "0", "--spares"], env=self.env,
                       capture_output=True)
        subprocess.run([PY, "-m", "worktreebox.cli.main", "db", "stop"], env=self.env, capture_output=True)
        subprocess.run(["rm", "-rf", str(self.path)])


def _background_done(home: Home, timeout: float = 60.0) -> None:
    """Wait until the spare databases a `new` started making are made: the floor is measured on a
    machine that is not also doing wtbox's background work."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = False
        for p in psutil.process_iter(["cmdline", "environ"]):
            args = p.info["cmdline"] or []
            if "refill" in args and "db" in args and (p.info["environ"] or {}).get("WTBOX_HOME") == str(home.path):
                busy = True
                break
        if not busy:
            return
        time.sleep(0.05)


def _raw_add_rm(repo: Path, work: Path, i: int) -> tuple[float, float]:
    path = work / f"raw-layers-{i}"
    t0 = time.perf_counter()
    _git(repo, "worktree", "add", "-q", "-b", f"raw-layers-{i}", str(path), "HEAD")
    add = time.perf_counter() - t0
    t0 = time.perf_counter()
    _git(repo, "worktree", "remove", "--force", str(path))
    _git(repo, "branch", "-D", f"raw-layers-{i}")
    return add, time.perf_counter() - t0


def _disk(box: dict) -> int | None:
    if "disk_bytes" in box:
        return box["disk_bytes"]
    return None


def _core(home: Home, repo: Path, work: Path, runs: int, tag: str) -> dict:
    """new/ls/rm in process (WTBOX_NO_SERVER=1) and served, alternating within each run, so both
    see the same machine; the plain keys (wtbox_new) are the served figures, as users get them."""
    home.new(f"warm-{tag}", repo)  # builds the tree, the golden database, starts the cluster
    home.run("rm", "--all", "--yes", "--force")
    home.server_up()
    raw_add, raw_rm, timings, disk = [], [], [], []
    took: dict[str, dict[str, list[float]]] = {m: {"new": [], "rm": [], "ls": []} for m in MODES}
    for i in range(runs):
        _background_done(home)
        a, r = _raw_add_rm(repo, work, i)
        raw_add.append(a)
        raw_rm.append(r)
        for mode in MODES:
            served = mode == "served"
            _background_done(home)
            t, box = home.new(f"b-{tag}-{i}-{mode[0]}", repo, served=served)
            took[mode]["new"].append(t)
            timings.append(box.get("timings") or {})
            _, status = home.run("status", box["id"], "--json")
            st = json.loads(status)
            disk.append((st.get("disk_bytes"), st.get("worktree_bytes")))
            t, _ = home.run("ls", served=served)
            took[mode]["ls"].append(t)
            t, _ = home.run("rm", box["id"], served=served)
            took[mode]["rm"].append(t)
    srv = took["served"]
    out = {"raw_worktree_add": _ms(raw_add), "wtbox_new": _ms(srv["new"]),
           "wtbox_new_in_process": _ms(took["in_process"]["new"]),
           "raw_worktree_remove": _ms(raw_rm), "wtbox_rm": _ms(srv["rm"]),
           "wtbox_rm_in_process": _ms(took["in_process"]["rm"]),
           # what any command costs before doing anything, served and with Python's start-up and imports
           "wtbox_ls": _ms(srv["ls"]), "wtbox_ls_in_process": _ms(took["in_process"]["ls"])}
    out["new_ratio"] = round(out["wtbox_new"]["p50_ms"] / out["raw_worktree_add"]["p50_ms"], 2)
    out["rm_ratio"] = round(out["wtbox_rm"]["p50_ms"] / out["raw_worktree_remove"]["p50_ms"], 2)
    out["served_vs_in_process"] = {c: round(out[f"wtbox_{c}"]["p50_ms"] / out[f"wtbox_{c}_in_process"]["p50_ms"], 2)
                                   for c in ("new", "rm", "ls")}
    phases = sorted({k for t in timings for k in t})
    if phases:
        out["phases_p50_ms"] = {k: round(statistics.median([t.get(k, 0) for t in timings]) * 1000, 1) for k in phases}
    known = [d for d in disk if d[0] is not None]
    if known:
        out["disk_per_box_kb"] = round(statistics.median(d[0] for d in known) / 1024, 1)  # logs, metrics too
        out["worktree_per_box_kb"] = round(statistics.median(d[1] or 0 for d in known) / 1024, 1)
    return out


def _five_at_once(home: Home, repo: Path, single_p50_ms: float) -> dict:
    _background_done(home)
    with ThreadPoolExecutor(5) as pool:
        t0 = time.perf_counter()
        list(pool.map(lambda k: home.new(f"five-{k}", repo), range(5)))
        wall = time.perf_counter() - t0
    home.run("rm", "--all", "--yes", "--force")
    return {"five_new_wall_ms": round(wall * 1000, 1),
            "five_vs_one": round(wall * 1000 / single_p50_ms, 2)}


def _deps(work: Path, runs: int) -> dict:
    repo = deps_repo(work)
    home = Home(work)
    try:
        t_first, first = home.new("deps-first", repo)
        later, later_new = [], []
        for i in range(max(runs, 3)):
            t, box = home.new(f"deps-{i}", repo)
            later_new.append(t)
            later.append((box.get("timings") or {}).get("deps", float("nan")))
        check = subprocess.run([str(Path(box["path"]) / ".venv" / "bin" / "python"), "-c",
                                "import django, benchapp; print(benchapp.__file__)"],
                               capture_output=True, text=True)
        return {"locked_packages": _locked_packages(repo),
                "first_new_s": round(t_first, 2), "first_deps_s": (first.get("timings") or {}).get("deps"),
                "later_deps": _ms(later), "later_new": _ms(later_new),
                "later_deps_ok": statistics.median(later) * 1000 <= 200,
                "editable_resolves_to_box": check.returncode == 0 and check.stdout.strip().startswith(box["path"])}
    finally:
        home.close()


def bench_layers(runs: int = 10, work: Path | None = None) -> dict:
    work = Path(work) if work else ROOT / ".bench"
    work.mkdir(parents=True, exist_ok=True)
    repo = django_size_repo(work)
    files = _git(repo, "ls-files").count("\n")
    mb = sum(p.stat().st_size for p in repo.rglob("*") if p.is_file() and ".git" not in p.parts) / 1e6
    out: dict = {"repo": {"files": files, "mb": round(mb, 1)}}
    home = Home(work)
    try:
        out["default"] = _core(home, repo, work, runs, "cow")
        out["default"].update(_five_at_once(home, repo, out["default"]["wtbox_new"]["p50_ms"]))
        d = out["default"]
        d["targets_ok"] = {"new_le_300ms": d["wtbox_new"]["p50_ms"] <= 300, "new_le_half_raw": d["new_ratio"] <= 0.5,
                           "rm_le_300ms": d["wtbox_rm"]["p50_ms"] <= 300, "five_le_1.5x": d["five_vs_one"] <= 1.5}
    finally:
        home.close()
    home = Home(work, WTBOX_MOUNTS="checkout")
    try:
        out["checkout_fallback"] = _core(home, repo, work, max(3, runs // 2), "plain")
    finally:
        home.close()
    if os.environ.get("WTBOX_BENCH_NO_DEPS") != "1":
        try:
            out["deps"] = _deps(work, runs)
        except Exception as e:  # e.g. PyPI unreachable: the other figures still count
            out["deps"] = {"error": f"{type(e).__name__}: {e}"}
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = bench_layers(args.runs)
    print(json.dumps(result, indent=2))
