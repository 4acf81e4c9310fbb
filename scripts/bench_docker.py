"""`wtbox new` with the docker providers versus native, in the same run (database schema mode,
observability on, one service). The host servers are warmed first: the first `new` on a host
pays for initdb or the container start once, which we report separately."""
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
TOML = """[box]
ports = ["web"]
[database]
mode = "schema"
[observability]
enabled = true
"""


def _images() -> dict[str, str]:
    out = subprocess.run(["bash", str(ROOT / "scripts" / "build_images.sh")], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError("docker images could not be built: " + (out.stderr.strip().splitlines() or ["?"])[-1])
    return dict(line.split("=", 1) for line in out.stdout.split() if "=" in line)


def _run(home: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "worktreebox.cli.main", *args], capture_output=True, text=True,
                          env={**env, "WTBOX_HOME": str(home)})
    if proc.returncode != 0:
        raise RuntimeError(f"wtbox {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def bench_docker(runs: int = 5, work: Path | None = None) -> dict:
    sys.path.insert(0, str(ROOT))
    from worktreebox.providers import docker_engine as dockerenv

    ok, why = dockerenv.docker_available()
    if not ok:
        return {"skipped": f"Docker is not available: {why}"}
    t0 = time.perf_counter()
    images = _images()
    build_s = time.perf_counter() - t0
    tmp = Path(tempfile.mkdtemp(prefix="wtbox-bench-docker-", dir=work))
    repo = tmp / "repo"
    repo.mkdir()
    (repo / "wtbox.toml").write_text(TOML)
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "x"]):
        subprocess.run(["git", "-C", str(repo), "-c", "user.email=b@e", "-c", "user.name=b", *args], check=True)
    base = {k: v for k, v in os.environ.items() if k not in ("WTBOX_POSTGRES_URL", "PYTHONDONTWRITEBYTECODE")}
    base.update({"WTBOX_NO_AUTO_GC": "1", "TESTCONTAINERS_RYUK_DISABLED": "true"})
    variants = {
        "native": {**base, "WTBOX_PORT_RANGE": "28000-28499"},
        "docker": {**base, "WTBOX_PORT_RANGE": "28500-28999", "WTBOX_DATABASE_PROVIDER": "docker",
                   "WTBOX_OBSERVABILITY_PROVIDER": "docker", **images},
    }
    out: dict = {"images_warm_build_s": round(build_s, 2)}
    try:
        for name, env in variants.items():
            home = tmp / name
            t = time.perf_counter()
            first = json.loads(_run(home, env, "new", "first", "--repo", str(repo), "--json").stdout)["id"]
            out[f"{name}_first_new_ms"] = round((time.perf_counter() - t) * 1000, 1)
            _run(home, env, "rm", first)
        times: dict[str, list[float]] = {n: [] for n in variants}
        for i in range(runs):
            for name, env in variants.items():  # interleaved: both see the same machine state
                home = tmp / name
                t = time.perf_counter()
                box = json.loads(_run(home, env, "new", f"b{i}", "--repo", str(repo), "--json").stdout)["id"]
                times[name].append(time.perf_counter() - t)
                _run(home, env, "rm", box)
        for name, vals in times.items():
            vals.sort()
            out[f"{name}_new_p50_ms"] = round(vals[len(vals) // 2] * 1000, 1)
        out["docker_vs_native"] = round(out["docker_new_p50_ms"] / out["native_new_p50_ms"], 2)
    finally:
        for name, env in variants.items():
            home = tmp / name
            subprocess.run([sys.executable, "-m", "worktreebox.cli.main", "rm", "--all", "--yes", "--force"],
                           env={**env, "WTBOX_HOME": str(home)}, capture_output=True)
            subprocess.run([sys.executable, "-m", "worktreebox.cli.main", "db", "stop"],
                           env={**env, "WTBOX_HOME": str(home)}, capture_output=True)
            subprocess.run([sys.executable, "-m", "worktreebox.cli.main", "gc", "--grace", "0", "--spares"],
                           env={**env, "WTBOX_HOME": str(home)}, capture_output=True)
        dockerenv.remove_labelled(tmp / "docker", host_level=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return out
