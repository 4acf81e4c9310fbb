"""The host router: latency of a small request through it versus straight to the box's port, in
one run, alternating on kept-alive connections (goal: <= 1 ms added at p50); route set-up per box
(`new --json`'s timings.router, after the router runs: goal <= 20 ms); the router's cold start
with the first box, and its idle memory."""
from __future__ import annotations

import http.client
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "tests" / "apps" / "router_app.py"  # the router tests' app: a page naming its box
TOML = ('[box]\nports = ["web"]\n[database]\nmode = "none"\n[observability]\nenabled = false\n'
        f'[services.web]\ncmd = "{sys.executable} {APP} http {{{{ ports.web }}}} {{{{ box.id }}}}"\n'
        'ready = "http://127.0.0.1:{{ ports.web }}/"\n')


def _summary(values: list[float]) -> dict:
    v = sorted(values)
    return {"p50_ms": round(v[len(v) // 2] * 1000, 3), "p90_ms": round(v[int(len(v) * 0.9)] * 1000, 3), "n": len(v)}


def _repo(tmp: Path) -> Path:
    repo = tmp / "repo"
    repo.mkdir()
    (repo / "wtbox.toml").write_text(TOML)
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "x"]):
        subprocess.run(["git", "-C", str(repo), "-c", "user.email=b@e", "-c", "user.name=b", *args], check=True)
    return repo


def _latency(direct: int, router: int, host: str, requests: int) -> tuple[list[float], list[float]]:
    """`requests` GETs of / each way, alternating, each way on its own kept-alive connection."""
    ways = {"direct": (http.client.HTTPConnection("127.0.0.1", direct), f"127.0.0.1:{direct}"),
            "router": (http.client.HTTPConnection("127.0.0.1", router), f"{host}:{router}")}
    times: dict[str, list[float]] = {"direct": [], "router": []}
    for i in range(requests * 2 + 100):
        name = ("direct", "router")[i % 2]
        conn, host_header = ways[name]
        t0 = time.perf_counter()
        conn.request("GET", "/", headers={"Host": host_header})
        body = conn.getresponse().read()
        if i >= 100:  # the first requests warm both paths up
            times[name].append(time.perf_counter() - t0)
        assert b"box " in body, body
    for conn, _ in ways.values():
        conn.close()
    return times["direct"], times["router"]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def bench_router(runs: int = 10, work: Path | None = None) -> dict:
    sys.path.insert(0, str(ROOT))
    from worktreebox.host import Host
    from worktreebox.router.state import read_state

    work = Path(work or tempfile.gettempdir())
    tmp = Path(tempfile.mkdtemp(prefix="wtbox-bench-router-", dir=work))
    host = Host(tmp / "home")
    repo = _repo(tmp)
    try:
        boxes = [host.new(f"bench-{i}", repo=repo) for i in range(max(3, runs))]
        setup = [b.data["timings"]["router"] for b in boxes[1:]]
        state = read_state(host.home)
        direct, routed = _latency(boxes[0].ports["web"], state["port"], "bench-0.localhost", 500 * max(1, runs))
        out = {"boxes": len(boxes), "router_start_ms": round(boxes[0].data["timings"]["router"] * 1000, 1),
               "route_setup": _summary(setup), "direct": _summary(direct), "through_router": _summary(routed)}
        out["caddy_rss_mb"] = _rss_mb(state["pid"][0])
        out["added_p50_ms"] = round(out["through_router"]["p50_ms"] - out["direct"]["p50_ms"], 3)
        out["added_ok"] = out["added_p50_ms"] <= 1.0
        out["route_setup_ok"] = out["route_setup"]["p50_ms"] <= 20.0
        return out
    finally:
        for b in host.list():
            host.rm(b, force=True)
        subprocess.run(["rm", "-rf", str(tmp)])
