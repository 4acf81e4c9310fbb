"""What the sandbox's parts cost (section `sandbox_parts`; part B's `sandbox` section measures
whole boxes with and without it).

- holder: `create` of a holder without network helper (bwrap ready + firewall), with pasta
  (`open`), pasta's attach alone, the firewall load alone, and `destroy`;
- launch: `true` through procs.spawn into a cgroup leaf, bare and through the launcher
  (nsenter + setpriv + env --chdir), and its parts, alternating; p50 of each and the difference;
- forward: a new connection's HTTP GET through a forward (services/forwards.py in this process)
  against the same GET straight to the server, alternating; and through the real path (host
  socket -> forwards in the box's network namespace -> server inside the box);
- idle: PSS of a holder's processes and of pasta;
- git: the box's own git dir (what providers/sandbox/gitdir.py makes) against the copy-on-write
  overlay of the repository's .git (the design it replaced, prototyped here), on a generated
  repo of Django's size: made, first `git status` and a commit inside the box, fetched back.

Run as root: `.venv/bin/python scripts/bench.py --only sandbox_parts`.
"""
from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worktreebox.providers.sandbox import network  # noqa: E402
from worktreebox.providers.sandbox.base import LEAF, NONE, OPEN, Spec, box_binds  # noqa: E402
from worktreebox.providers.sandbox.namespaces import Namespaces  # noqa: E402
from worktreebox.system import cgroups, procs  # noqa: E402


def stats(values: list[float]) -> dict:
    v = sorted(values)
    return {"p50_ms": round(statistics.median(v) * 1000, 2), "p90_ms": round(v[int(0.9 * (len(v) - 1))] * 1000, 2),
            "n": len(v)}


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


class Boxes:
    """Holders for boxes of one scratch home, each with its cgroup."""

    def __init__(self, home: Path) -> None:
        self.home, self.sandbox = home, Namespaces()
        self.backend = cgroups.for_home(home)

    def spec(self, network: str = OPEN, repo_git: Path | None = None) -> Spec:
        import secrets

        box_id = f"bench-{secrets.token_hex(4)}"
        box_dir = self.home / "boxes" / box_id
        for name in ("worktree", "cache", "tmp", "home", "git", "run"):
            (box_dir / name).mkdir(parents=True, exist_ok=True)
        if self.backend is not None:
            self.backend.create(box_id, cgroups.Limits())
        return Spec(box_id, self.home, box_dir, box_binds(box_dir, repo_git=repo_git), network=network)

    def leaf(self, spec: Spec, name: str = LEAF) -> cgroups.Leaf | None:
        return cgroups.Leaf(self.home, spec.box_id, name) if self.backend else None

    def create(self, spec: Spec):
        return self.sandbox.create(spec, cgroup=self.leaf(spec))

    def end(self, spec: Spec) -> float:
        took, _ = timed(lambda: self.sandbox.destroy(spec.box_id, spec.box_dir))
        if self.backend is not None:
            self.backend.remove(spec.box_id)
        return took


def bench_holder(boxes: Boxes, runs: int) -> dict:
    made = {"create_offline": [], "create_open": [], "pasta_attach": [], "firewall_load": [], "destroy": []}
    blocked = network.host_addresses()
    for _ in range(runs):
        for kind, net in (("create_offline", NONE), ("create_open", OPEN)):
            spec = boxes.spec(net)
            took, holder = timed(lambda s=spec: boxes.create(s))
            made[kind].append(took)
            if net == NONE:
                spec.network = OPEN
                made["pasta_attach"].append(timed(lambda s=spec, h=holder: network.attach(
                    h, s, log=s.run_dir / "sandbox.log", cgroup=boxes.leaf(s)))[0])
                made["firewall_load"].append(timed(lambda h=holder: network.apply_rules(
                    h, network.ruleset(OPEN, blocked, network.Outbound())))[0])
            made["destroy"].append(boxes.end(spec))
    return {k: stats(v) for k, v in made.items()}


def bench_launch(boxes: Boxes, runs: int) -> dict:
    spec = boxes.spec(NONE)
    holder = boxes.create(spec)
    prefix = boxes.sandbox.prefix(holder, cwd=spec.box_dir / "worktree")
    nsenter = prefix[:prefix.index("setpriv") - 1]
    variants = {"bare": [], "nsenter": [*nsenter, "--"], "nsenter_setpriv": prefix[:prefix.index("env")],
                "launcher": prefix}
    times: dict[str, list[float]] = {k: [] for k in variants}
    leaf = boxes.leaf(spec, "_exec")
    try:
        for _ in range(runs * 4):
            for name, pre in variants.items():
                times[name].append(timed(lambda p=pre: procs.spawn([*p, "true"], cgroup=leaf).wait())[0])
    finally:
        boxes.end(spec)
    out = {k: stats(v) for k, v in times.items()}
    out["launcher_added_ms"] = round(out["launcher"]["p50_ms"] - out["bare"]["p50_ms"], 2)
    return out


SERVER = '''
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''


def get_once(port: int) -> float:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/")
    assert conn.getresponse().read() == b"ok"
    conn.close()
    return time.perf_counter() - t0


def bench_forward(boxes: Boxes, runs: int) -> dict:
    from worktreebox.services.forwards import ForwardsThread

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    fw = ForwardsThread()
    try:
        _wait(lambda: get_once(port))
        listener = socket.create_server(("127.0.0.1", 0))
        fport = listener.getsockname()[1]
        fw.add("web", listener, ("127.0.0.1", port))
        direct, forwarded = [], []
        for _ in range(runs * 20):
            direct.append(get_once(port))
            forwarded.append(get_once(fport))
        out = {"direct": stats(direct), "forwarded": stats(forwarded)}
        out["forward_added_ms"] = round(out["forwarded"]["p50_ms"] - out["direct"]["p50_ms"], 2)
        out["through_the_box"] = bench_forward_in_box(boxes, runs)
        return out
    finally:
        fw.stop()
        procs.stop_group(server)


def bench_forward_in_box(boxes: Boxes, runs: int) -> dict:
    spec = boxes.spec(NONE)
    holder = boxes.create(spec)
    env = {"PATH": "/usr/bin:/bin", "WTBOX_ID": spec.box_id, "WTBOX_BOX_DIR": str(spec.box_dir)}
    server = procs.spawn(boxes.sandbox.command(holder, ["python3", "-c", SERVER, "3000"], cwd=spec.box_dir / "tmp"),
                         env=env, cgroup=boxes.leaf(spec, "web"))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    forwards = procs.spawn(boxes.sandbox.netns_command(holder, [sys.executable, "-m", "worktreebox.services.forwards",
                                                                f"{listener.fileno()}:web:127.0.0.1:3000"]),
                           pass_fds=(listener.fileno(),), env=env, cgroup=boxes.leaf(spec, "_supervisor"))
    listener.close()
    try:
        _wait(lambda: get_once(port))
        return stats([get_once(port) for _ in range(runs * 20)])
    finally:
        procs.stop_groups([forwards, server])
        boxes.end(spec)


def bench_idle(boxes: Boxes) -> dict:
    spec = boxes.spec(OPEN)
    holder = boxes.create(spec)
    try:
        time.sleep(1)
        import psutil

        inside = [psutil.Process(holder.pid), *psutil.Process(holder.pid).children(recursive=True)]
        outer = psutil.Process(holder.pid).parent()
        pasta = [psutil.Process(holder.pasta_pid)]
        return {"holder_processes": len(inside) + 1,
                "holder_pss_kb": procs.memory_of([outer, *inside])["pss_bytes"] // 1024,
                "pasta_pss_kb": procs.memory_of(pasta)["pss_bytes"] // 1024}
    finally:
        boxes.end(spec)


def _wait(fn, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fn()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def bench_sandbox_parts(runs: int = 10, work: Path | None = None) -> dict:
    if os.geteuid() != 0:
        return {"skipped": "run as root (the root-mode sandbox)"}
    scratch = Path(tempfile.mkdtemp(prefix="wtbox-bench-sandbox-"))
    boxes = Boxes(scratch / "home")
    try:
        out = {"holder": bench_holder(boxes, runs), "launch": bench_launch(boxes, runs),
               "forward": bench_forward(boxes, runs), "idle": bench_idle(boxes)}
        from bench_sandbox_git import bench_git  # the git designs: their own module (a prototype inside)

        out["git"] = bench_git(boxes, runs, work or ROOT / ".bench")
        return out
    finally:
        from worktreebox.providers.mounts.base import unmount_all

        for box_id in boxes.backend.box_keys() if boxes.backend else ():  # what a failed step left
            boxes.sandbox.destroy(f"bench-{box_id}", scratch / "home" / "boxes" / f"bench-{box_id}")
            boxes.backend.remove(box_id)
        unmount_all(scratch)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    import json

    with contextlib.suppress(KeyboardInterrupt):
        print(json.dumps(bench_sandbox_parts(int(sys.argv[1]) if len(sys.argv) > 1 else 5), indent=1))

