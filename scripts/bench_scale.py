"""Many idle boxes (issue 27): what they cost the host and how fast commands stay.

N boxes (default 100) of a tiny app (one Python HTTP service; the default config: its own database
schema, VictoriaMetrics, traces) made K at a time (default 4) through the `wtbox` command, then:
creation time (total, p50 per `new`), CPU the idle boxes use over 20 s (in all and per box, from
the processes of the home and from the boxes' cgroups), RSS and PSS per kind of process, `ls`,
`status`, `top` and `gc` with N live, and `rm --all`.

    .venv/bin/python scripts/bench.py --only scale                 # N=100, K=4
    BENCH_BOXES=20 .venv/bin/python scripts/bench.py --only scale --json

It loads a 2-core host for minutes: run it on a quiet machine (`uptime` below 2).
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
WTBOX = [str(Path(sys.executable).parent / "wtbox")]
IDLE_SECONDS = 20.0
SETTLE_SECONDS = 45.0  # after the last `new`: calm boxes' stores sleep after 30 s (store_sleep.SLEEP_AFTER)

APP = '''import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok\\n")
    def log_message(self, *a):
        pass
# No poll timeout: an idle app that wakes twice a second (socketserver's default) would cost the
# host more than the box around it.
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever(poll_interval=None)
'''
TOML = '''[box]
ports = ["web"]

[services.web]
cmd = "python3 app.py"
ready = "http://127.0.0.1:{{ ports.web }}/"
'''


def make_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "app.py").write_text(APP)
    (path / "wtbox.toml").write_text(TOML)
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "tiny app"]):
        subprocess.run(["git", "-C", str(path), "-c", "user.email=b@e", "-c", "user.name=b", *args], check=True)
    return path


def pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, round((len(v) - 1) * p))]


class Home:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.env = {**os.environ, "WTBOX_HOME": str(path), "WTBOX_NO_AUTO_GC": "1"}

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([*WTBOX, *args], capture_output=True, text=True, env=self.env)
        if check and proc.returncode != 0:
            raise RuntimeError(f"wtbox {' '.join(args)} failed: {proc.stderr.strip()[-500:]}")
        return proc

    def timed(self, *args: str, runs: int = 5) -> dict:
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            self.run(*args)
            times.append(time.perf_counter() - t0)
        return {"p50_ms": round(statistics.median(times) * 1000, 1), "p90_ms": round(pct(times, 0.9) * 1000, 1),
                "n": runs}


# ---------------------------------------------------------------- the home's processes

# A sandboxed box's own plumbing: its holder (bubblewrap, and the pid 1 it keeps), slirp4netns, and
# the nsenter that each launched process waits in. They are wtbox's, not the app's, and count in
# wtbox's own figure (kind "sandbox").
SANDBOX_TOOLS = ("bwrap", "slirp4netns", "nsenter", "sleep")
# The zygote (services/zygote.py) is the home's, its memory shared with every supervisor it forked:
# counted in wtbox's own figure per box as its share (its total over N), as every kind is.
OWN_KINDS = ("supervisor", "keeper", "receiver", "victoria-metrics", "sandbox", "zygote")


def kind_of(proc, home: str, slirps: frozenset[int] = frozenset(),
            supervisors: frozenset[int] = frozenset()) -> str | None:
    """What a process of this home is: supervisor, keeper, receiver, victoria-metrics, sandbox, zygote,
    app, postgres or cli-server; None when it is not this home's. `slirps`, `supervisors`: the
    boxes' slirp4netns and supervisor pids, from their pid files (slirp4netns carries no box
    variable; a supervisor forked by the zygote has the zygote's command line and environment)."""
    import psutil

    try:
        cmd = " ".join(proc.cmdline())
        env = proc.environ()
    except (psutil.Error, OSError):
        return None
    in_box = env.get("WTBOX_BOX_DIR", "").startswith(home + "/boxes/")
    if proc.pid in slirps or (in_box and proc.name() in SANDBOX_TOOLS):
        return "sandbox"
    if proc.pid in supervisors:
        return "supervisor"
    if "worktreebox.services.zygote" in cmd and home in cmd:
        return "zygote"
    if "worktreebox.services.supervisor" in cmd and home in cmd:
        try:
            parent = " ".join(proc.parent().cmdline())
        except (psutil.Error, AttributeError):
            parent = ""
        return "keeper" if "worktreebox.services.supervisor" in parent else "supervisor"
    if in_box and "otlp_receiver" in cmd:
        return "receiver"
    if in_box and "victoria-metrics" in cmd:
        return "victoria-metrics"
    if in_box:
        return "app"
    if ("postgres" in cmd and home in cmd) or env.get("PGDATA", "").startswith(home):
        return "postgres"
    if "worktreebox.cli.server" in cmd and home in " ".join(env.get(k, "") for k in ("WTBOX_HOME",)):
        return "cli-server"
    return None


def _pids_in(home: Path, name: str) -> frozenset[int]:
    """The pids the boxes' run/<name> files name (first field)."""
    pids = set()
    for pid_file in home.glob(f"boxes/*/run/{name}"):
        try:
            pids.add(int(pid_file.read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            pass
    return frozenset(pids)


def home_processes(home: Path) -> dict[int, tuple[str, object]]:
    import psutil

    slirps, supervisors = _pids_in(home, "slirp4netns.pid"), _pids_in(home, "supervisor.pid")
    out = {}
    for p in psutil.process_iter():
        kind = kind_of(p, str(home), slirps, supervisors)
        if kind:
            out[p.pid] = (kind, p)
    return out


def cpu_of(procs: dict) -> dict[int, float]:
    import psutil

    out = {}
    for pid, (_, p) in procs.items():
        try:
            t = p.cpu_times()
            out[pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def box_cgroups_cpu(home: Path) -> tuple[float, int]:
    """CPU seconds used so far by every box of the home, from the boxes' cgroups; and how many
    boxes' stores sleep (telemetry/store_sleep.py)."""
    sys.path.insert(0, str(ROOT))
    from worktreebox.host import Host
    from worktreebox.system import cgroups
    from worktreebox.telemetry import store_sleep

    backend = cgroups.for_home(home)
    if backend is None:
        return 0.0, 0
    total, asleep = 0.0, 0
    for box in Host(home).list():
        total += backend.cpu_seconds(box.id) or 0.0
        asleep += store_sleep.asleep(box.run_dir)
    return total, asleep


def idle_cpu(home: Path, boxes: int, seconds: float = IDLE_SECONDS) -> dict:
    procs = home_processes(home)
    before, (cg_before, asleep_before), t0 = cpu_of(procs), box_cgroups_cpu(home), time.monotonic()
    time.sleep(seconds)
    after, (cg_after, asleep_after), wall = cpu_of(procs), box_cgroups_cpu(home), time.monotonic() - t0
    by_kind: dict[str, float] = {}
    for pid, cpu in after.items():
        if pid in before:
            kind = procs[pid][0]
            by_kind[kind] = by_kind.get(kind, 0.0) + cpu - before[pid]
    cpus = {k: round(v / wall, 4) for k, v in sorted(by_kind.items())}
    boxes_cpu = (cg_after - cg_before) / wall
    own = sum(v for k, v in cpus.items() if k in OWN_KINDS)
    return {"seconds": round(wall, 1), "stores_asleep": [asleep_before, asleep_after],
            "box_cgroups_cpu": round(boxes_cpu, 4),
            "box_cgroups_milli_cpu_per_box": round(1000 * boxes_cpu / max(boxes, 1), 3),
            "processes_cpu_by_kind": cpus, "wtbox_own_cpu": round(own, 4),
            "wtbox_own_milli_cpu_per_box": round(1000 * own / max(boxes, 1), 3)}


def memory(home: Path, boxes: int) -> dict:
    """RSS and PSS per kind of process: in all, and per box."""
    import psutil

    totals: dict[str, list[float]] = {}
    for _, (kind, p) in home_processes(home).items():
        try:
            m = p.memory_full_info()
        except psutil.Error:
            continue
        t = totals.setdefault(kind, [0, 0, 0])
        t[0] += m.rss / 1e6
        t[1] += m.pss / 1e6
        t[2] += 1
    per_box = {k: {"processes": int(n), "rss_mb": round(r / max(boxes, 1), 1), "pss_mb": round(s / max(boxes, 1), 1)}
               for k, (r, s, n) in sorted(totals.items())}
    own = [v for k, v in per_box.items() if k in OWN_KINDS]
    return {"per_box": per_box,
            "wtbox_own_per_box": {"processes": round(sum(v["processes"] for v in own) / max(boxes, 1), 2),
                                  "rss_mb": round(sum(v["rss_mb"] for v in own), 1),
                                  "pss_mb": round(sum(v["pss_mb"] for v in own), 1)}}


# ---------------------------------------------------------------- the run

def make_boxes(home: Home, repo: Path, n: int, k: int) -> dict:
    def one(i: int) -> float:
        t0 = time.perf_counter()
        home.run("new", f"s{i}", "--repo", str(repo), "--json")
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(k) as pool:
        times = list(pool.map(one, range(n)))
    total = time.perf_counter() - t0
    return {"boxes": n, "at_a_time": k, "total_s": round(total, 1), "new_p50_s": round(statistics.median(times), 2),
            "new_max_s": round(max(times), 2)}


def bench_scale(work: Path | None = None, boxes: int | None = None, at_a_time: int | None = None) -> dict:
    n = boxes or int(os.environ.get("BENCH_BOXES", "100"))
    k = at_a_time or int(os.environ.get("BENCH_AT_A_TIME", "4"))
    tmp = Path(tempfile.mkdtemp(prefix="wtbox-bench-scale-", dir=work))
    home = Home(tmp / "home")
    out: dict = {"load_average_at_start": round(os.getloadavg()[0], 2),
                 "pythondontwritebytecode": bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))}
    try:
        repo = make_repo(tmp / "repo")
        home.path.mkdir(parents=True)
        (home.path / "config.toml").write_text(f"[host]\nmax_boxes = {n + 10}\n")  # the default is 64
        home.run("ls")  # the home and its CLI server exist before the timing starts
        out["create"] = make_boxes(home, repo, n, k)
        time.sleep(SETTLE_SECONDS)
        out["idle"] = idle_cpu(home.path, n)
        out["memory"] = memory(home.path, n)
        # `s7` is a task name and the prefix of s70..s79's ids: it must resolve to s7 (issue 27)
        out["commands"] = {"ls": home.timed("ls"), "status": home.timed("status", "s7" if n > 7 else "s0"),
                           "top": home.timed("top"), "gc": home.timed("gc", runs=3)}
        t0 = time.perf_counter()
        home.run("rm", "--all", "--force", "--yes")
        out["rm_all_s"] = round(time.perf_counter() - t0, 1)
        out["targets"] = targets(out, n)
        out["load_average_at_end"] = round(os.getloadavg()[0], 2)
    finally:
        home.run("rm", "--all", "--force", "--yes", check=False)
        home.run("gc", "--spares", check=False)
        home.run("db", "stop", check=False)  # the home's own PostgreSQL outlived its deleted dir
        home.run("server", "stop", check=False)  # last: gc and db are served, and would start it again
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def targets(out: dict, n: int) -> dict:
    """Issue 27's goals (for 100 and 300 boxes), checked where this run can tell."""
    cmd = out["commands"]
    checks = {
        "idle_cpu_per_box_le_1_milli": out["idle"]["box_cgroups_milli_cpu_per_box"] <= 1.0,
        "own_pss_per_box_le_15_mb": out["memory"]["wtbox_own_per_box"]["pss_mb"] <= 15,
        "own_rss_per_box_le_30_mb": out["memory"]["wtbox_own_per_box"]["rss_mb"] <= 30,
        "ls_le_150_ms": cmd["ls"]["p50_ms"] <= 150, "status_le_150_ms": cmd["status"]["p50_ms"] <= 150,
        "top_le_300_ms": cmd["top"]["p50_ms"] <= 300, "gc_le_1_s": cmd["gc"]["p50_ms"] <= 1000,
        "rm_all_per_box_le_0.1_s": out["rm_all_s"] / n <= 0.1,
    }
    if n >= 100:
        checks["create_100_le_35_s"] = out["create"]["total_s"] * 100 / n <= 35
    return checks


if __name__ == "__main__":
    print(json.dumps(bench_scale(), indent=2))
