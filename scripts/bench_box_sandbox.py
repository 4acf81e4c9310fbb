"""Whole boxes with and without the sandbox (section `sandbox`; `sandbox_parts` measures its parts).

On core's generated repo (3,500 files, 42 MB; no database, no metrics store, so the sandbox is
what differs), in two homes, one with `[host] sandbox` = namespaces and one with off, alternating
run by run so both see the same load; once served (each home its own CLI server, as a user's
`wtbox` runs) and once in process (WTBOX_NO_SERVER=1):
- `wtbox new` (the CLI, end to end), `wtbox exec BOX true`, `wtbox rm`;
- a claim from the warm pool (`wtbox new` of a pooled box: the holder was made with it);
- `wtbox new` of a small repo with one service (Python's http.server), until it is ready: there a
  supervisor runs in both modes (core's repo has no service, so without the sandbox none starts,
  while a sandboxed box always has one: its forwards).
Goals (issue 26): new and claim <= 1.10x without the sandbox; exec <= +15 ms.

Run as root: `.venv/bin/python scripts/bench.py --only sandbox [--runs N]`.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
PY = sys.executable
MODES = ("namespaces", "off")
SERVICE_TOML = ('[database]\nmode = "none"\n[observability]\nenabled = false\n[services.web]\n'
                f'cmd = "{PY} -m http.server $PORT --bind 127.0.0.1"\nready = "tcp:{{{{ ports.web }}}}"\n')


def _service_repo(work: Path) -> Path:
    repo = work / "service-repo"
    if not (repo / ".git").exists():
        repo.mkdir(parents=True, exist_ok=True)
        (repo / "wtbox.toml").write_text(SERVICE_TOML)
        for args in (["init", "-q", "-b", "main"], ["add", "-A"],
                     ["-c", "user.email=b@e", "-c", "user.name=b", "commit", "-qm", "bench"]):
            subprocess.run(["git", "-C", str(repo), *args], check=True)
    return repo


def _env(home: Path, mode: str, ports: str, served: bool) -> dict[str, str]:
    return {**os.environ, "WTBOX_HOME": str(home), "WTBOX_NO_AUTO_GC": "1", "WTBOX_SANDBOX": mode,
            "WTBOX_PORT_RANGE": ports, "WTBOX_NO_SERVER": "" if served else "1"}


IN_PROCESS = [PY, "-m", "worktreebox.cli.main"]
LAUNCHER = [str(Path(PY).with_name("wtbox"))]  # what a user types: served by the home's CLI server


def _wtbox(env: dict[str, str], *args: str) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    cmd = IN_PROCESS if env.get("WTBOX_NO_SERVER") == "1" else LAUNCHER
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"wtbox {' '.join(args)} failed: {proc.stderr.strip()}")
    return took, proc


def _claim(env: dict[str, str], repo: Path, name: str) -> float:
    """Fill the pool with one box (not timed), then the claim's `wtbox new` (timed)."""
    from worktreebox.fleet import pool as P
    from worktreebox.host import Host

    saved = {k: os.environ.get(k) for k in ("WTBOX_HOME", "WTBOX_SANDBOX", "WTBOX_PORT_RANGE")}
    os.environ.update({k: env[k] for k in saved})
    try:
        host = Host(Path(env["WTBOX_HOME"]))
        host.registry.set_pool_size(str(repo), 0)  # no filler beside the measurement
        P.top_up(host, P.resolve_target(repo), 1)
        host.registry.close()
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    took, proc = _wtbox(env, "new", name, "--repo", str(repo), "--json")
    assert json.loads(proc.stdout)["from_pool"], proc.stdout
    return took


def bench_sandbox(runs: int = 5, work: Path | None = None) -> dict:
    """Both ways a command runs: served (the `wtbox` a user types: its home's CLI server forks the
    command, and its zygote the supervisors) and in process (WTBOX_NO_SERVER=1: Python's start-up
    and wtbox's imports in every command, a supervisor started as its own Python)."""
    return {"served": _bench(runs, work, served=True), "in_process": _bench(runs, work, served=False)}


def _bench(runs: int, work: Path | None, *, served: bool) -> dict:
    from bench import build_repo, summary

    runs = max(3, runs)
    work = Path(work or tempfile.mkdtemp(prefix="wtbox-bench-sandbox-"))
    repo = build_repo(work / "bench-repo")
    small = _service_repo(work)
    base = Path(tempfile.mkdtemp(prefix="sandbox-", dir=work))
    # A slice of its own, below the slices test homes lease from (20000-29999) and below the kernel's
    # ephemeral ports (32768-60999 here): there an outgoing connection's own port once took the
    # service's, and the run ended on "Address already in use".
    lo = 12000 + random.randrange(40) * 200
    envs = {m: _env(base / m, m, f"{lo + 100 * i}-{lo + 100 * i + 99}", served) for i, m in enumerate(MODES)}
    times: dict[str, dict[str, list[float]]] = {m: {"new": [], "exec_true": [], "rm": [], "claim": [],
                                                    "new_with_service": []} for m in MODES}
    try:
        for i in range(runs + 1):  # the first round warms caches and starts each home's server: not kept
            for mode in (MODES if i % 2 else MODES[::-1]):
                env, t = envs[mode], times[mode]
                took_new, proc = _wtbox(env, "new", f"b{i}", "--repo", str(repo), "--json")
                box = json.loads(proc.stdout)["id"]
                took_exec, _ = _wtbox(env, "exec", box, "true")
                took_rm, _ = _wtbox(env, "rm", "--force", box)
                took_claim = _claim(env, repo, f"c{i}")
                took_service, _ = _wtbox(env, "new", f"s{i}", "--repo", str(small), "--json")
                if i:
                    t["new_with_service"].append(took_service)
                    t["new"].append(took_new)
                    t["exec_true"].append(took_exec)
                    t["rm"].append(took_rm)
                    t["claim"].append(took_claim)
                for row in json.loads(_wtbox(env, "ls", "--json")[1].stdout):
                    _wtbox(env, "rm", "--force", row["id"])
        out: dict = {m: {k: summary(v) for k, v in t.items()} for m, t in times.items()}
        ns, off = out["namespaces"], out["off"]
        out["new_ratio"] = round(ns["new"]["p50_ms"] / off["new"]["p50_ms"], 3)
        out["claim_ratio"] = round(ns["claim"]["p50_ms"] / off["claim"]["p50_ms"], 3)
        out["new_with_service_ratio"] = round(ns["new_with_service"]["p50_ms"] / off["new_with_service"]["p50_ms"], 3)
        out["rm_ratio"] = round(ns["rm"]["p50_ms"] / off["rm"]["p50_ms"], 3)
        out["exec_extra_ms"] = round(ns["exec_true"]["p50_ms"] - off["exec_true"]["p50_ms"], 1)
        out["new_ok"], out["claim_ok"] = out["new_ratio"] <= 1.10, out["claim_ratio"] <= 1.10
        out["exec_ok"] = out["exec_extra_ms"] <= 15
        out["PYTHONDONTWRITEBYTECODE"] = os.environ.get("PYTHONDONTWRITEBYTECODE", "")
        return out
    finally:
        for env in envs.values():  # the boxes of a run that ended early too: gc leaves live boxes alone
            subprocess.run([*IN_PROCESS, "rm", "--all", "--force", "--yes"], env=env, capture_output=True)
            subprocess.run([*IN_PROCESS, "gc", "--grace", "0", "--spares"], env=env, capture_output=True)
            subprocess.run([*IN_PROCESS, "server", "stop"], env=env, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    print(json.dumps(bench_sandbox(ap.parse_args().runs), indent=2))
