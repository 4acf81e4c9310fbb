#!/usr/bin/env python3
"""Benchmarks of per-box traces; scripts/bench.py imports bench_traces() (`--only traces`).

    .venv/bin/python scripts/bench_traces.py [--runs 5] [--spans 1000000]

- ingest: spans/s the receiver stores on one core (pinned), fed pre-encoded OTLP/protobuf
  batches of 512 spans (the SDK's batch size) over keep-alive connections from the other core;
  floors: the same batches decoded in-process (ParseFromString alone, and decode + convert + encode).
- memory: the receiver's idle RSS/USS/PSS (fresh, and idle after the ingest run), next to a bare
  Python process and to what the same server costs as a thread of the supervisor.
- start: receiver spawn → /health answers, next to `python -c pass`.
- query: `wtbox traces BOX ...` over a store of --spans spans (written straight into the store
  files, rotated as the receiver rotates them); floors: `cat` and `grep -E -c` of the same regex.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

MB = 1024 * 1024
BATCH = 512
BARE_TOML = '[database]\nmode = "none"\n'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ms(values: list[float]) -> dict:
    v = sorted(values)
    return {"p50_ms": round(statistics.median(v) * 1000, 1), "p90_ms": round(v[int(0.9 * (len(v) - 1))] * 1000, 1),
            "n": len(v)}


def _memory(pid: int) -> dict:
    import psutil

    m = psutil.Process(pid).memory_full_info()
    return {"rss_mb": round(m.rss / MB, 1), "uss_mb": round(m.uss / MB, 1), "pss_mb": round(m.pss / MB, 1)}


# ---------------------------------------------------------------- ingest


def _request(rng: random.Random, n: int = BATCH) -> bytes:
    """One ExportTraceServiceRequest of n server spans shaped like an instrumented web app's."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import KeyValue

    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.append(KeyValue(key="service.name", value={"string_value": "web"}))
    rs.resource.attributes.append(KeyValue(key="wtbox.box", value={"string_value": "bench-00000000"}))
    ss = rs.scope_spans.add()
    ss.scope.name = "bench"
    now = time.time_ns()
    for i in range(n):
        sp = ss.spans.add()
        sp.trace_id = rng.randbytes(16)
        sp.span_id = rng.randbytes(8)
        if i % 4:
            sp.parent_span_id = rng.randbytes(8)
        route = rng.choice(["/items", "/items/{id}", "/users/{id}", "/login", "/health"])
        sp.name = f"GET {route}"
        sp.kind = 2
        sp.start_time_unix_nano = now + i * 1000
        sp.end_time_unix_nano = sp.start_time_unix_nano + int(rng.lognormvariate(15, 1.2))
        for k, v in (("http.method", "GET"), ("http.route", route), ("net.peer.ip", "127.0.0.1"),
                     ("user_agent.original", "python-requests/2.31")):
            sp.attributes.append(KeyValue(key=k, value={"string_value": v}))
        sp.attributes.append(KeyValue(key="http.status_code", value={"int_value": 200}))
        sp.status.code = 2 if i % 50 == 0 else 0
    return req.SerializeToString()


def _start_receiver(box_dir: Path, port: int, cpu: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "WTBOX_ID": box_dir.name, "WTBOX_BOX_DIR": str(box_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "worktreebox.services.otlp_receiver", str(box_dir), str(port), ""],
                            cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if cpu is not None:
        os.sched_setaffinity(proc.pid, {cpu})
    return proc


def _wait_healthy(port: int, timeout: float = 15.0) -> float:
    from worktreebox.telemetry.vmclient import healthy

    t0 = time.perf_counter()
    while not healthy(f"http://127.0.0.1:{port}", timeout=0.25):
        if time.perf_counter() - t0 > timeout:
            raise SystemExit(f"the receiver on port {port} did not answer")
        time.sleep(0.002)
    return time.perf_counter() - t0


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _send(port: int, bodies: list[bytes], requests: int, connections: int = 2) -> float:
    """Wall seconds to POST `requests` bodies over `connections` keep-alive connections."""
    import http.client

    counter = iter(range(requests))
    lock = threading.Lock()
    errors: list[str] = []

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            conn.request("POST", "/v1/traces", body=bodies[i % len(bodies)],
                         headers={"Content-Type": "application/x-protobuf"})
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                errors.append(str(r.status))
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(connections)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"the receiver answered {errors[:3]}")
    return time.perf_counter() - t0


def bench_ingest(runs: int, requests: int = 200) -> dict:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from worktreebox.telemetry.traces import otlp, store

    rng = random.Random(42)
    bodies = [_request(rng) for _ in range(8)]
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, client_cpus = cpus[-1], set(cpus[:-1]) or {cpus[0]}
    # Floors, in this process on one core: protobuf decoding alone, then decode + convert + encode.
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {server_cpu})
    try:
        def per_second(fn, reps: int = 40) -> float:
            t0 = time.perf_counter()
            for i in range(reps):
                fn(bodies[i % len(bodies)])
            return reps * BATCH / (time.perf_counter() - t0)

        decode = statistics.median(per_second(ExportTraceServiceRequest.FromString) for _ in range(3))
        convert = statistics.median(per_second(
            lambda b: store.encode(otlp.span_records(ExportTraceServiceRequest.FromString(b))[0])) for _ in range(3))
    finally:
        os.sched_setaffinity(0, old)
    rates, rss_fresh, rss_after = [], None, None
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            box_dir = Path(tmp) / f"bench-{i:08x}"
            box_dir.mkdir()
            port = _free_port()
            proc = _start_receiver(box_dir, port, cpu=server_cpu)
            try:
                _wait_healthy(port)
                if i == 0:
                    time.sleep(2)
                    rss_fresh = _memory(proc.pid)
                os.sched_setaffinity(0, client_cpus)
                try:
                    wall = _send(port, bodies, requests)
                finally:
                    os.sched_setaffinity(0, old)
                rates.append(requests * BATCH / wall)
                if i == 0:
                    time.sleep(3)
                    rss_after = _memory(proc.pid)
                stored = sum(1 for _ in open(box_dir / "traces" / store.FILE, "rb"))
                assert stored == requests * BATCH, stored
            finally:
                _stop(proc)
    return {"spans_per_s_one_core": round(statistics.median(rates)), "runs": len(rates),
            "floor_decode_only_spans_per_s": round(decode), "floor_decode_convert_encode_spans_per_s": round(convert),
            "ratio_to_decode_only": round(statistics.median(rates) / decode, 3),
            "receiver_idle_fresh": rss_fresh, "receiver_idle_after_ingest": rss_after}


# ---------------------------------------------------------------- memory and start


_PROBE = """
import os, sys, time
def rss():
    return int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]) / 1024
import worktreebox.services.supervisor, worktreebox.telemetry.collector
base = rss()
from worktreebox.services import otlp_receiver as receiver
srv = receiver.Server(int(sys.argv[1]), receiver.Receiver(__import__('pathlib').Path(sys.argv[2]), 'b', None))
import threading
threading.Thread(target=srv.serve_forever, daemon=True).start()
import socket  # 20 exports over a bare socket, so the thread has loaded what serving traces takes
body = open(sys.argv[3], 'rb').read()
head = (f"POST /v1/traces HTTP/1.1\\r\\nHost: x\\r\\nContent-Type: application/x-protobuf\\r\\n"
        f"Content-Length: {len(body)}\\r\\n\\r\\n").encode()
with socket.create_connection(("127.0.0.1", int(sys.argv[1]))) as s:
    for _ in range(20):
        s.sendall(head + body)
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
time.sleep(1)
print(round(base, 1), round(rss(), 1))
"""


def bench_memory_and_start(runs: int) -> dict:
    """What the receiver costs as its own process versus as a thread of the supervisor."""
    floor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    time.sleep(1.5)
    py = _memory(floor.pid)
    floor.kill()
    floor.wait()
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "request.bin"
        body.write_bytes(_request(random.Random(3)))
        out = subprocess.run([sys.executable, "-c", _PROBE, str(_free_port()), tmp, str(body)], cwd=str(ROOT),
                             capture_output=True, text=True, check=True).stdout.split()
        sup_base, sup_with = float(out[0]), float(out[1])
        starts, pys = [], []
        for i in range(runs):
            d = Path(tmp) / f"start-{i:08x}"
            d.mkdir()
            port = _free_port()
            t0 = time.perf_counter()
            proc = _start_receiver(d, port)
            _wait_healthy(port)
            starts.append(time.perf_counter() - t0)
            _stop(proc)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], check=True)
            pys.append(time.perf_counter() - t0)
    return {"python_idle": py, "as_supervisor_thread_extra_rss_mb": round(sup_with - sup_base, 1),
            "supervisor_rss_mb_before_thread": sup_base,
            "receiver_start_to_healthy": _ms(starts), "floor_python_c_pass": _ms(pys)}


# ---------------------------------------------------------------- query over a large store


def _build_store(dest: Path, n: int) -> dict:
    """n spans in the store layout (rotated files), cached under the bench work dir."""
    from worktreebox.telemetry.traces import store

    marker = dest / f".complete-{n}"
    if marker.exists():
        return json.loads(marker.read_text())
    shutil.rmtree(dest, ignore_errors=True)
    rng = random.Random(7)
    w = store.SpanWriter(dest)
    t0 = 1_750_000_000_000_000_000
    slow, errors, trace_mid = 0, 0, None
    batch = []
    for i in range(n):
        # Mostly fast spans (lognormal around 3 ms); one in 20,000 takes 200-900 ms.
        if rng.random() < 1 / 20000:
            dur = rng.randrange(200_000_000, 900_000_000)
            slow += 1
        else:
            dur = min(int(rng.lognormvariate(14.9, 1.0)), 199_000_000)
        status = 2 if rng.random() < 0.01 else 0
        errors += status == 2
        trace = f"{rng.getrandbits(128):032x}"
        if i == n // 2:
            trace_mid = trace
        route = rng.choice(["/items", "/items/{id}", "/users/{id}", "/login"])
        batch.append(store.span_record(
            start_ns=t0 + i * 1_000_000, end_ns=t0 + i * 1_000_000 + dur, status=status, trace_id=trace,
            span_id=f"{rng.getrandbits(64):016x}", parent_id="" if i % 4 == 0 else f"{rng.getrandbits(64):016x}",
            service=rng.choice(["web", "web", "web", "worker"]), name=f"GET {route}", kind=2,
            attributes={"http.method": "GET", "http.route": route, "http.status_code": 200,
                        "net.peer.ip": "127.0.0.1"}))
        if len(batch) == BATCH:
            w.write(store.encode(batch))
            batch = []
    w.write(store.encode(batch))
    w.close()
    facts = {"spans": n, "slow": slow, "errors": errors, "trace_mid": trace_mid,
             "bytes": sum(p.stat().st_size for p in store.files(dest)), "files": len(store.files(dest))}
    marker.write_text(json.dumps(facts))
    return facts


def _timed(cmd: list[str], runs: int, env: dict | None = None, discard: bool = False) -> tuple[dict, str]:
    """Wall p50/p90 of a command, plus its CPU time (user + system): on a busy shared host the CPU
    figure is the steadier one."""
    import resource

    times, cpu, out = [], [], ""
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, stdout=subprocess.DEVNULL if discard else subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=env)
        times.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if p.returncode not in (0, 1):  # grep -c exits 1 when nothing matches
            raise SystemExit(f"{' '.join(cmd[:4])} failed: {p.stderr.strip()}")
        out = p.stdout or ""
    return {**_ms(times), "cpu_p50_ms": round(statistics.median(cpu) * 1000, 1)}, out


def bench_query(runs: int, work: Path, spans: int) -> dict:
    from bench_metrics import _tiny_repo

    from worktreebox.config.load import parse_repo_config
    from worktreebox.host import Host
    from worktreebox.telemetry.traces import query, store

    facts = _build_store(work / f"traces-store-{spans}", spans)
    src_files = store.files(work / f"traces-store-{spans}")
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        host = Host(home)
        box = host.new("tracebench", repo=_tiny_repo(work / "tiny-repo"), config=parse_repo_config(BARE_TOML, "bench"))
        try:
            tdir = box.dir / "traces"
            tdir.mkdir(exist_ok=True)
            for f in src_files:
                try:
                    os.link(f, tdir / f.name)
                except OSError:
                    shutil.copy2(f, tdir / f.name)
            env = {**os.environ, "WTBOX_HOME": str(home), "WTBOX_NO_AUTO_GC": "1"}
            wt = [sys.executable, "-m", "worktreebox.cli.main", "traces", box.id]
            files = [str(tdir / f.name) for f in src_files]
            out: dict = {"store": {k: facts[k] for k in ("spans", "bytes", "files", "slow")}}
            res, text = _timed([*wt, "--min-duration", "200ms", "--json"], runs, env)
            found = json.loads(text)
            assert len(found) == min(facts["slow"], 100) and all(s["duration_ms"] >= 200 for s in found)
            out["min_duration_200ms_rare"] = {**res, "matches": len(found)}
            out["min_duration_10ms_limit_100"] = _timed([*wt, "--min-duration", "10ms", "--json"], runs, env)[0]
            out["errors_of_service_worker"] = _timed([*wt, "--status", "error", "--service", "worker", "--json"],
                                                     runs, env)[0]
            res, text = _timed([*wt, "--trace", facts["trace_mid"], "--json"], runs, env)
            assert json.loads(text)["trace_id"] == facts["trace_mid"]
            out["trace_tree_one_id"] = res
            out["newest_100_no_filter"] = _timed([*wt, "--json"], runs, env)[0]
            # Floors over the same bytes: reading them, and grep with the same raw-line regex.
            out["floor_cat"] = _timed(["cat", *files], runs, discard=True)[0]
            rx = query.SpanFilter(min_duration="200ms").rx.pattern.decode()
            rx = re.sub(r"\(\?=\\d\{\d+\}\)", "", rx)  # ERE has no lookahead
            ere = rx.replace("(?:", "(").replace(r"\d", "[0-9]").replace(r"\{", "{")
            res, text = _timed(["grep", "-E", "-c", ere, *files], runs, {**os.environ, "LC_ALL": "C"})
            assert sum(int(x.rsplit(":", 1)[-1]) for x in text.split()) == facts["slow"], text
            out["floor_grep_same_regex"] = res
            out["ratio_min_duration_to_grep"] = round(out["min_duration_200ms_rare"]["p50_ms"] / res["p50_ms"], 2)
            out["ratio_min_duration_to_grep_cpu"] = round(out["min_duration_200ms_rare"]["cpu_p50_ms"]
                                                          / res["cpu_p50_ms"], 2)
        finally:
            host.rm(box.id, force=True)
            host.registry.close()
    return out


def _flat(d: dict, prefix: str = "") -> dict:
    """One level, as bench.py's table prints it: timing dicts ({p50_ms, ...}) stay whole."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and "p50_ms" not in v:
            out.update(_flat(v, f"{prefix}{k}_"))
        else:
            out[prefix + k] = v
    return out


def bench_traces(runs: int = 5, work: Path | None = None, spans: int = 1_000_000) -> dict:
    work = work or ROOT / ".bench"
    work.mkdir(parents=True, exist_ok=True)
    runs = max(3, min(runs, 5))
    out = {"ingest": bench_ingest(runs), "memory": bench_memory_and_start(runs),
           "query": bench_query(runs, work, spans)}
    return _flat(out)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--spans", type=int, default=1_000_000)
    args = ap.parse_args()
    print(json.dumps(bench_traces(args.runs, spans=args.spans), indent=2))
