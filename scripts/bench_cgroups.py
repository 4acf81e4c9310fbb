"""What per-box cgroups cost and what they buy (section `cgroups`).

- spawn: a child started through procs.spawn into a leaf of a box's cgroup, against the same
  spawn without a cgroup (the floor), p50 per spawn of `true`;
- new + rm of a tiny box (no database, no metrics, one service) with cgroups, against the same
  with WTBOX_CGROUPS=off;
- isolation: box B's `wtbox probe` p95 while box A burns 2 x cores + 1 processes, each in its
  own session, as a ratio of B's p95 (of 200 requests) with A idle (the median of alternating
  rounds' ratios); with cgroups (busy boxes made background), with cgroups only, and without,
  their rounds interleaved. Target: at most 1.5 with cgroups.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PY = sys.executable

SERVER = '''
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
'''
BURNER = (ROOT / "tests" / "apps" / "burner.py").read_text()  # the one the tests use


def _toml(service: str, cmd: str, ready: bool) -> str:
    check = 'ready = "tcp:{{ ports.web }}"\n' if ready else ""
    return ('[box]\nports = ["web"]\n[database]\nmode = "none"\n[observability]\nenabled = false\n'
            f'[services.{service}]\ncmd = "{cmd}"\n{check}')


def _repo(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "bench"]):
        subprocess.run(["git", "-C", str(path), "-c", "user.email=b@e", "-c", "user.name=b", *args], check=True)
    return path


def _wtbox(home: Path, *args: str, cgroups_on: bool = True) -> dict | list:
    env = {**os.environ, "WTBOX_HOME": str(home), "WTBOX_NO_AUTO_GC": "1"}
    if not cgroups_on:
        env["WTBOX_CGROUPS"] = "off"
    proc = subprocess.run([PY, "-m", "worktreebox.cli.main", *args, "--json"], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"wtbox {' '.join(args)}: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def _spawn_p50(runs: int, leaf) -> float:
    from worktreebox.system import procs

    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        procs.spawn(["true"], cgroup=leaf).wait()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1000, 2)


def _pair(home: Path, tmp: Path, name: str, cgroups_on: bool, burners: int) -> tuple[dict, dict]:
    """Box A (burners that spin while A's dir holds a `spin` file) and box B (an HTTP service)."""
    a_repo = _repo(tmp / f"a-{name}", {"burner.py": BURNER, "wtbox.toml": _toml(
        "burn", f"{PY} burner.py $WTBOX_BOX_DIR/spin {burners}", ready=False)})
    b_repo = _repo(tmp / f"b-{name}", {"server.py": SERVER, "wtbox.toml": _toml("web", f"{PY} server.py", True)})
    return (_wtbox(home, "new", "burner", "--repo", str(a_repo), cgroups_on=cgroups_on),
            _wtbox(home, "new", "latency", "--repo", str(b_repo), cgroups_on=cgroups_on))


def _isolation(home: Path, tmp: Path, rounds: int) -> dict:
    """Three setups at once, their rounds interleaved, so that the host's other load (this machine
    is shared) weighs on all alike; within a round B is probed with A idle, then with A burning.
    The setups: cgroups with busy boxes made background (the default), cgroups only (a second
    home with `[host] background_busy = false`), neither."""
    burners = 2 * (os.cpu_count() or 1) + 1
    plain = tmp / "home-no-background"
    plain.mkdir()
    (plain / "config.toml").write_text("[host]\nbackground_busy = false\n")
    setups = {"with_cgroups": (home, True), "cgroups_without_background": (plain, True),
              "without_cgroups": (home, False)}
    pairs = {name: _pair(h, tmp, name, on, burners) for name, (h, on) in setups.items()}
    seen: dict[str, tuple[list, list]] = {name: ([], []) for name in setups}
    try:
        for name, (_, b) in pairs.items():
            _wtbox(setups[name][0], "probe", b["id"], "/", "-n", "20", cgroups_on=setups[name][1])  # warm up
        for _ in range(rounds):
            for name, (a, b) in pairs.items():
                h, on = setups[name]
                flag = Path(a["dir"]) / "spin"
                quiet, loaded = seen[name]
                quiet.append(_wtbox(h, "probe", b["id"], "/", "-n", "200", cgroups_on=on)["p95_ms"])
                flag.touch()
                # The burners look for the flag every 20 ms; A's supervisor needs a few looks (up to
                # 1.5 s) to see them burn and make A a background box (background.py), as it would
                # for a runaway test suite that burns for longer than a moment.
                time.sleep(2.0)
                loaded.append(_wtbox(h, "probe", b["id"], "/", "-n", "200", cgroups_on=on)["p95_ms"])
                flag.unlink()
                time.sleep(0.1)
    finally:
        for name, (a, b) in pairs.items():
            (Path(a["dir"]) / "spin").unlink(missing_ok=True)
            _wtbox(setups[name][0], "rm", "--force", a["id"], b["id"], cgroups_on=setups[name][1])
    out = {}
    for name, (quiet, loaded) in seen.items():
        out[name] = {
            "quiet_p95_ms_p50": round(statistics.median(quiet), 2),
            "loaded_p95_ms_p50": round(statistics.median(loaded), 2),
            "ratio": round(statistics.median(lo / q for q, lo in zip(quiet, loaded, strict=True)), 2)}
    return {"burners": burners, "rounds": rounds, **out}


def bench_cgroups(runs: int = 10, work: Path | None = None) -> dict:
    from worktreebox.system import cgroups

    tmp = Path(tempfile.mkdtemp(prefix="wtbox-bench-cgroups-", dir=work))
    home = tmp / "home"
    backend = cgroups.for_home(home)
    if backend is None:
        return {"skipped": cgroups.unavailable(home)}
    out: dict = {"version": backend.version}
    try:
        backend.create("bench-0000cafe", cgroups.Limits())
        leaf = cgroups.Leaf(home, "bench-0000cafe", "_exec")
        n = max(50, runs * 20)
        out["spawn_plain_p50_ms"] = _spawn_p50(n, None)
        out["spawn_in_cgroup_p50_ms"] = _spawn_p50(n, leaf)
        backend.remove("bench-0000cafe")

        repo = _repo(tmp / "tiny", {"server.py": SERVER, "wtbox.toml": _toml("web", f"{PY} server.py", True)})
        times: dict[str, list[float]] = {}
        for i in range(max(4, runs // 2)):
            for on in (True, False):  # alternating: the host's load drifts over a run
                key = "with_cgroups" if on else "without_cgroups"
                t0 = time.perf_counter()
                box = _wtbox(home, "new", f"t{i}", "--repo", str(repo), cgroups_on=on)
                times.setdefault(f"new_{key}", []).append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                _wtbox(home, "rm", "--force", box["id"], cgroups_on=on)
                times.setdefault(f"rm_{key}", []).append(time.perf_counter() - t0)
        for name, values in times.items():
            out[f"{name}_p50_ms"] = round(statistics.median(values) * 1000, 1)

        out["isolation"] = _isolation(home, tmp, rounds=max(10, runs))
        out["isolation_target_ratio"] = 1.5
        out["isolation_ok"] = out["isolation"]["with_cgroups"]["ratio"] <= 1.5
    finally:
        for box_id in backend.box_keys():
            backend.remove(box_id)
        subprocess.run(["rm", "-rf", str(tmp)])
    return out


if __name__ == "__main__":
    print(json.dumps(bench_cgroups(), indent=2))
