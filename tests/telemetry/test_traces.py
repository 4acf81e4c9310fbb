"""Traces per box: a real app instrumented with opentelemetry-sdk sending to its box's OTLP receiver,
spans queried through `wtbox traces`, span durations in the box's VictoriaMetrics, isolation, rm, gc."""
from __future__ import annotations

import gzip
import json
import random
import shutil
import socket
import sqlite3
import sys
import urllib.error
import urllib.request

import psutil
import pytest
from helpers import APPS, port_bindable, wait_for

from worktreebox.resources import traces as traces_resource
from worktreebox.telemetry.exposition import histogram_buckets
from worktreebox.telemetry.traces import query, store
from worktreebox.telemetry.vmclient import Client

APP = (APPS / "otel_app.py").read_text()
WEB_TOML = f"""
[database]
mode = "none"
[services.web]
cmd = "{sys.executable} app.py {{{{ ports.web }}}}"
env = {{ SLOW_MS = "250" }}
ready = "http://127.0.0.1:{{{{ ports.web }}}}/health"
"""
BARE_TOML = '[database]\nmode = "none"\n'
# What an app run with `wtbox exec` does: the SDK configured by nothing but the box's OTEL_* env.
SEND = """
import os, sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter()))
tracer = provider.get_tracer("send")
for i in range(int(sys.argv[1])):
    with tracer.start_as_current_span("work-" + os.environ["WTBOX_ID"]) as span:
        print(format(span.get_span_context().trace_id, "032x"))
provider.shutdown()
"""

pytestmark = pytest.mark.skipif(shutil.which("victoria-metrics") is None,
                                reason="victoria-metrics is not installed (Debian package victoria-metrics)")


@pytest.fixture(autouse=True)
def own_port_range(monkeypatch):
    lo = random.randrange(21000, 29000, 100)
    monkeypatch.setenv("WTBOX_PORT_RANGE", f"{lo}-{lo + 99}")


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def post(url: str, body: bytes, content_type: str, encoding: str | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": content_type, **({"Content-Encoding": encoding} if encoding else {})}
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def bucket_index(seconds: float) -> int:
    edges = histogram_buckets("wtbox_span_duration_seconds")
    return next((i for i, le in enumerate(edges) if seconds <= le), len(edges))


def receiver_alive(box) -> bool:
    return traces_resource.receiver_pid(box) is not None


def json_span(trace_id: str, span_id: str, name: str, service: str = "curl") -> bytes:
    """An OTLP/JSON export request of one span (ids in hex, as the OTLP spec writes them)."""
    return json.dumps({"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
        "scopeSpans": [{"spans": [{
            "traceId": trace_id, "spanId": span_id, "name": name, "kind": 2,
            "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000000420000000",
            "attributes": [{"key": "http.route", "value": {"stringValue": "/x"}}],
            "status": {"code": 2, "message": "boom"}}]}]}]}).encode()


# ---------------------------------------------------------------- a real instrumented service


def test_app_spans_tree_histogram_and_logs(host, make_repo, run_wtbox):
    box = host.new("otel", repo=make_repo({"app.py": APP}, toml=WEB_TOML))
    url = box.data["traces"]["url"]
    assert url == f"http://127.0.0.1:{box.ports['otlp']}"  # the host's; the box's own at the port it sees
    assert box.env["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://127.0.0.1:{box.inside_ports['otlp']}"
    assert box.env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    assert box.env["OTEL_RESOURCE_ATTRIBUTES"] == f"wtbox.box={box.id}"
    web = f"http://127.0.0.1:{box.ports['web']}"

    slow = [get(f"{web}/slow") for _ in range(3)]
    for _ in range(5):
        get(f"{web}/fast")
    with pytest.raises(urllib.error.HTTPError):
        get(f"{web}/error")

    # --min-duration finds each slow child, with its request's server span as parent; nothing fast.
    def slow_spans():
        out = json.loads(run_wtbox("traces", box.id, "--min-duration", "200ms", "--json").stdout)
        return out if len([s for s in out if s["name"] == "slow-child"]) == 3 else None

    found = wait_for(slow_spans)
    assert found, run_wtbox("traces", box.id).stdout
    children = [s for s in found if s["name"] == "slow-child"]
    assert {s["name"] for s in found} == {"slow-child", "GET /slow"}
    for req in slow:
        [child] = [s for s in children if s["trace_id"] == req["trace_id"]]
        assert child["parent_span_id"] == req["span_id"] and child["service"] == "web"
        assert child["duration_ms"] >= 250 and abs(child["duration_ms"] - req["child_ms"]) < 5
        assert child["attributes"] == {"sleep.ms": 250.0} and child["status"] == "unset"
        assert set(child) >= {"trace_id", "span_id", "parent_span_id", "name", "service", "start", "duration_ms",
                              "status", "attributes"}
    assert all(s["duration_ms"] >= 200 for s in found)

    # Filters combine; the human table names the trace.
    errors = json.loads(run_wtbox("traces", box.id, "--status", "error", "--json").stdout)
    assert [(s["name"], s["status"]) for s in errors] == [("GET /error", "error")]
    named = json.loads(run_wtbox("traces", box.id, "--name", "GET /f*", "--since", "5m", "--json").stdout)
    assert [s["name"] for s in named] == ["GET /fast"] * 5
    assert json.loads(run_wtbox("traces", box.id, "--service", "other", "--json").stdout) == []
    assert len(json.loads(run_wtbox("traces", box.id, "--limit", "2", "--json").stdout)) == 2
    table = run_wtbox("traces", box.id, "--min-duration", "0.2s").stdout
    assert "TRACE_ID" in table.splitlines()[0] and slow[0]["trace_id"] in table

    # --trace: the request's tree, children indented under it, with durations.
    tid = slow[0]["trace_id"]
    tree = run_wtbox("traces", box.id, "--trace", tid).stdout.splitlines()
    assert tree[0].startswith(f"trace {tid}") and "3 spans" in tree[0]
    assert tree[1].startswith("  GET /slow  ") and " ms" in tree[1]
    assert {ln.split("  ")[2] for ln in tree[2:]} == {"slow-child", "fast-child"}  # one level deeper
    assert all(ln.startswith("    ") and not ln.startswith("     ") for ln in tree[2:])
    doc = json.loads(run_wtbox("traces", box.id, "--trace", tid[:12], "--logs", "--json").stdout)
    assert doc["trace_id"] == tid and [(s["name"], s["depth"]) for s in doc["spans"]] == \
        [("GET /slow", 0), ("slow-child", 1), ("fast-child", 1)]
    # --logs: the JSON stdout line carrying trace_id and the OTLP log record of that request.
    msgs = {(r["stream"], r["level"]) for r in doc["logs"]}
    assert msgs == {("stdout", "info"), ("otlp", "warning")}, doc["logs"]
    [otlp_rec] = [r for r in doc["logs"] if r["stream"] == "otlp"]
    assert otlp_rec["trace_id"] == tid and otlp_rec["service"] == "web" and otlp_rec["msg"].startswith("slow request")
    # OTLP log records show up in `wtbox logs` too, under their service.
    assert "slow request took" in run_wtbox("logs", box.id, "--service", "web").stdout

    # The span histogram answers the 200 ms question within one bucket of what the app measured.
    client = Client(box.data["metrics"]["url"], box_id=box.id)
    q = ('histogram_quantile(0.95, sum(rate(wtbox_span_duration_seconds_bucket{span="slow-child"}[5m])) '
         'by (le))')

    def quantile():
        client.flush()
        res = client.query(q)["result"]
        return float(res[0]["value"][1]) if res else None

    got = wait_for(quantile, timeout=10)
    assert got is not None
    measured = max(r["child_ms"] for r in slow) / 1000
    assert abs(bucket_index(got) - bucket_index(measured)) <= 1, (got, measured)
    def slow_count():
        client.flush()  # the three spans may reach the store in more than one push
        res = client.query('wtbox_span_duration_seconds_count{span="slow-child"}')["result"]
        return res if res and res[0]["value"][1] == "3" else None

    [count] = wait_for(slow_count, timeout=10) or [{"value": [0, "none"]}]
    assert count["value"][1] == "3" and count["metric"]["box"] == box.id and count["metric"]["service"] == "web"
    [err] = client.query('wtbox_span_errors_total{span="GET /error"}')["result"]
    assert err["value"][1] == "1"
    # OTLP metrics from the app's SDK land in the same store.
    assert wait_for(lambda: client.flush() or client.query('otel_app_requests_total{route="/fast"}')["result"],
                    timeout=10)
    host.rm(box.id, force=True)


def test_service_name_per_service_and_exec_and_repo_override(host, make_repo, run_wtbox):
    toml = BARE_TOML + ('[services.a]\ncmd = "sleep 1000"\n[services.b]\ncmd = "sleep 1000"\n'
                        'env = { OTEL_SERVICE_NAME = "custom-b" }\n')
    box = host.new("names", repo=make_repo(toml=toml))
    specs = {s["name"]: s for s in json.loads((box.run_dir / "services.json").read_text())["services"]}
    assert specs["a"]["env"]["OTEL_SERVICE_NAME"] == "a" and specs["b"]["env"]["OTEL_SERVICE_NAME"] == "custom-b"
    env = dict(line.split("=", 1) for line in run_wtbox("exec", box.id, "--", "env").stdout.splitlines() if "=" in line)
    inside_url = f"http://127.0.0.1:{box.inside_ports['otlp']}"
    assert env["OTEL_SERVICE_NAME"] == "exec" and env["OTEL_EXPORTER_OTLP_ENDPOINT"] == inside_url
    # A process started from inside another box does not take that box's endpoint along.
    other = host.new("names2", repo=make_repo(toml=BARE_TOML + '[box]\nenv = { OTEL_SERVICE_NAME = "mine" }\n'))
    inner = run_wtbox("exec", box.id, "--", "env", env={"WTBOX_ID": other.id, **{
        k: v for k, v in other.env.items() if k.startswith("OTEL_")}}).stdout
    assert f"OTEL_EXPORTER_OTLP_ENDPOINT={inside_url}" in inner
    assert "OTEL_SERVICE_NAME=exec" in inner
    # The repo's own [box] env wins over wtbox's defaults.
    assert other.env["OTEL_SERVICE_NAME"] == "mine"
    assert "OTEL_SERVICE_NAME=mine" in run_wtbox("exec", other.id, "--", "env").stdout


# ---------------------------------------------------------------- isolation, rm, gc, bad input


def test_two_boxes_never_see_each_others_spans_and_rm_removes_all(host, make_repo, run_wtbox, wtbox_home):
    repo = make_repo({"send.py": SEND}, toml=BARE_TOML)
    a, b = host.new("tr-a", repo=repo), host.new("tr-b", repo=repo)
    assert a.ports["otlp"] != b.ports["otlp"]
    sent = {}
    for box, extra in ((a, {}), (b, {"OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"})):
        out = run_wtbox("exec", box.id, "--", sys.executable, "send.py", "4", env=extra).stdout
        sent[box.id] = set(out.split())
        assert len(sent[box.id]) == 4
    for mine, other in ((a, b), (b, a)):
        spans = query.find_spans(mine.dir)
        assert {s["trace_id"] for s in spans} == sent[mine.id]
        assert {s["name"] for s in spans} == {f"work-{mine.id}"} and {s["service"] for s in spans} == {"exec"}
        raw = b"".join(p.read_bytes() for p in store.files(mine.dir / "traces"))
        assert other.id.encode() not in raw and not any(t.encode() in raw for t in sent[other.id])
    gone = run_wtbox("traces", a.id, "--trace", next(iter(sent[b.id])), check=False)
    assert gone.returncode == 2 and "No span of trace" in gone.stderr

    # rm: the receiver process, its data and its port lease are gone; the other box still receives.
    pid = traces_resource.receiver_pid(a)
    assert pid and (a.dir / "traces").is_dir() and not port_bindable(a.ports["otlp"])
    run_wtbox("rm", a.id)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not a.dir.exists() and port_bindable(a.ports["otlp"])
    assert a.ports["otlp"] not in host.registry.leased_ports()
    assert get(b.data["traces"]["url"] + "/health")["ok"] and receiver_alive(b)

    # gc after a lost registry row (a crash): the orphaned receiver and its spans are swept.
    pid_b = traces_resource.receiver_pid(b)
    db = sqlite3.connect(wtbox_home / "registry.sqlite3")
    db.execute("DELETE FROM boxes WHERE id=?", (b.id,))
    db.commit()
    db.close()
    assert b.id in traces_resource.Traces().discover(host)
    run_wtbox("gc", "--json")
    assert not psutil.pid_exists(pid_b) or psutil.Process(pid_b).status() == psutil.STATUS_ZOMBIE
    assert not b.dir.exists() and port_bindable(b.ports["otlp"])


def test_garbage_gets_400_and_the_receiver_keeps_serving(host, make_repo, run_wtbox):
    box = host.new("garbage", repo=make_repo(toml=BARE_TOML))
    url = box.data["traces"]["url"]
    pid = traces_resource.receiver_pid(box)
    cases = [
        ("/v1/traces", b"not a protobuf", "application/x-protobuf", None, 400),
        ("/v1/traces", b"\x0a\xff\xff\xff\xff\x0f", "application/x-protobuf", None, 400),  # truncated field
        ("/v1/logs", b"{not json", "application/json", None, 400),
        ("/v1/metrics", b'["a list"]', "application/json", None, 400),
        ("/v1/traces", b'{"resourceSpans": 7}', "application/json", None, 400),
        ("/v1/traces", b"x", "text/plain", None, 415),
        ("/v1/traces", b"\x1f\x8bnot gzip", "application/x-protobuf", "gzip", 400),
        ("/v1/nope", b"", "application/json", None, 404),
    ]
    for path, body, ctype, enc, want in cases:
        code, answer = post(url + path, body, ctype, enc)
        assert code == want, (path, body, code, answer)
        assert answer.strip() and b"Traceback" not in answer
    with socket.create_connection(("127.0.0.1", box.ports["otlp"]), timeout=5) as s:
        s.sendall(b"\x00\x01garbage that is not HTTP\r\n\r\n")
        assert s.recv(64).startswith(b"HTTP/1.1 400")
    assert traces_resource.receiver_pid(box) == pid and get(url + "/health")["ok"]

    # Still serving: OTLP/JSON with hex ids (and gzip) is stored exactly, with partial success for bad ids.
    tid, sid = "5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174"
    code, answer = post(url + "/v1/traces", gzip.compress(json_span(tid.upper(), sid.upper(), "json-span")),
                        "application/json", "gzip")
    assert code == 200 and json.loads(answer) == {}
    code, answer = post(url + "/v1/traces", json_span("00" * 16, sid, "bad-id"), "application/json")
    assert code == 200 and json.loads(answer)["partialSuccess"]["rejectedSpans"] == "1"
    # A chunked body after `Expect: 100-continue`, on a keep-alive connection that then sends garbage.
    body = json_span("12" * 16, "34" * 8, "chunked-span")
    with socket.create_connection(("127.0.0.1", box.ports["otlp"]), timeout=5) as s:
        s.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Expect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n")
        assert s.recv(64).startswith(b"HTTP/1.1 100")
        half = len(body) // 2
        s.sendall(b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, body[:half], len(body) - half, body[half:]))
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        s.sendall(b"POST /v1/traces HTTP/1.1\r\nContent-Type: application/x-protobuf\r\nContent-Length: 3\r\n\r\nxyz")
        assert s.recv(4096).startswith(b"HTTP/1.1 400")
    assert [s["name"] for s in query.find_spans(box.dir, name="chunked-*")] == ["chunked-span"]
    [span] = query.find_spans(box.dir, name="json-*")
    assert (span["trace_id"], span["span_id"], span["name"], span["service"]) == (tid, sid, "json-span", "curl")
    assert span["duration_ms"] == 420.0 and span["status"] == "error" and span["status_message"] == "boom"
    assert span["start"] == "2023-11-14T22:13:20.000000Z" and span["kind"] == "server"
    bad = run_wtbox("traces", box.id, "--min-duration", "fast", check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("wtbox: --min-duration") and "Traceback" not in bad.stderr
    bad = run_wtbox("traces", box.id, "--trace", "xyz", check=False)
    assert bad.returncode == 2 and "not a trace id" in bad.stderr


def test_observability_off_has_no_receiver(host, make_repo, run_wtbox):
    box = host.new("noobs", repo=make_repo(toml=BARE_TOML + "[observability]\nenabled = false\n"))
    assert "otlp" not in box.ports and not any(k.startswith("OTEL_") for k in box.env)
    out = run_wtbox("traces", box.id, check=False)
    assert out.returncode == 1 and "no OTLP endpoint" in out.stderr


# ---------------------------------------------------------------- the store and its queries (no box)


def _random_records(rng: random.Random, n: int) -> list[dict]:
    names = ["GET /items", "GET /items/{id}", "db.query", 'quote"d', "ünïcode span", "x{\"s\":1,\"d\":9}"]
    out = []
    for i in range(n):
        start = 1_700_000_000_000_000_000 + rng.randrange(10**9) * 1000  # public() keeps microseconds
        dur = rng.choice([rng.randrange(10**6), rng.randrange(10**9), rng.randrange(10**10), 0])
        out.append(store.span_record(
            start_ns=start, end_ns=start + dur, status=rng.choice([0, 1, 2]), trace_id=f"{rng.randrange(16**32):032x}",
            span_id=f"{rng.getrandbits(64) or 1:016x}", parent_id=rng.choice(["", f"{rng.getrandbits(64):016x}"]),
            service=rng.choice(["web", "worker", "exec"]), name=rng.choice(names), kind=rng.randrange(6),
            # attributes that look like the leading keys must not fool the raw-line filters
            attributes={"s": 1, "nested": {"s": 99999999999999999999, "d": 10**12, "z": 0}, "n": i}))
    return out


def test_queries_match_a_plain_filter_over_rotated_files(tmp_path):
    rng = random.Random(7)
    recs = _random_records(rng, 3000)
    w = store.SpanWriter(tmp_path / "traces", max_bytes=200_000, keep=20)
    for i in range(0, len(recs), 97):
        w.write(store.encode(recs[i:i + 97]))
    w.close()
    assert len(store.files(tmp_path / "traces")) > 3  # rotated, all still read

    def expected(limit=None, **flt):
        f = query.SpanFilter(**flt)
        hits = [r for r in reversed(recs) if f.matches(r)][:limit]
        return sorted((r["s"], r["i"]) for r in hits)

    cases = [{}, {"min_duration": "200ms"}, {"min_duration": 0.5, "status": "error"}, {"service": "worker"},
             {"name": "GET /items*"}, {"name": 'quote"d', "min_duration": "1ms"}, {"status": "ok", "service": "web"},
             {"since": (recs[1500]["s"] + 1) / 1e9}, {"since": recs[10]["s"] / 1e9, "min_duration": "2.5s"},
             {"trace_id": recs[42]["t"]}, {"trace_id": recs[42]["t"][:8]}, {"name": "ünïcode*", "service": "exec"}]
    for flt in cases:
        for limit in (None, 5):
            got = query.find_spans(tmp_path, limit=limit, **flt)
            assert sorted((int(store_ns(s["start"])), s["span_id"]) for s in got) == expected(limit, **flt), flt
            assert all(isinstance(s["attributes"], dict) for s in got)


def store_ns(iso: str) -> int:
    """The start in ns back from public()'s ISO string (microsecond precision is what it keeps)."""
    import datetime as dt

    d = dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return int(d.timestamp()) * 1_000_000_000 + d.microsecond * 1000


def test_trace_tree_orders_children_and_keeps_orphans(tmp_path):
    t = "ab" * 16
    ms = 1_000_000
    mk = lambda sid, parent, name, start, dur: store.span_record(
        start_ns=start * ms, end_ns=(start + dur) * ms, status=0, trace_id=t, span_id=sid, parent_id=parent,
        service="web", name=name, kind=2, attributes={})
    w = store.SpanWriter(tmp_path / "traces")
    # Children end (and are exported) before their parent; one span's parent never arrived.
    w.write(store.encode([mk("2" * 16, "1" * 16, "second", 30, 5), mk("3" * 16, "1" * 16, "first", 20, 5),
                          mk("4" * 16, "9" * 16, "orphan", 25, 1), mk("1" * 16, "", "root", 10, 100)]))
    w.write(store.encode([mk("1" * 16, "", "root", 10, 100)]))  # a retried export: stored twice, shown once
    w.close()
    tree = query.trace_tree(tmp_path, t)
    assert [(s["name"], s["depth"]) for s in tree["spans"]] == [("root", 0), ("first", 1), ("second", 1), ("orphan", 0)]
    assert tree["spans"][-1]["parent_missing"] and tree["span_count"] == 4 and tree["duration_ms"] == 100.0
    with pytest.raises(Exception, match="No span of trace"):
        query.trace_tree(tmp_path, "cd" * 16)


def test_secrets_never_reach_the_store(host, make_repo):
    secret = "s3cr3t-\"value\"-123"
    box = host.new("secret", repo=make_repo(toml=BARE_TOML + '[services.idle]\ncmd = "sleep 1000"\n'),
                   secrets={"API_TOKEN": secret})
    url = box.data["traces"]["url"]
    span = json.loads(json_span("ab" * 16, "cd" * 8, f"GET /login?token={secret}"))
    span["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["attributes"].append(
        {"key": "auth", "value": {"stringValue": f"Bearer {secret}"}})
    assert post(url + "/v1/traces", json.dumps(span).encode(), "application/json")[0] == 200
    logs = {"resourceLogs": [{"scopeLogs": [{"logRecords": [{
        "body": {"stringValue": f"login with {secret}"}, "severityNumber": 17, "traceId": "ab" * 16,
        "attributes": [{"key": "token", "value": {"stringValue": secret}}]}]}]}]}
    assert post(url + "/v1/logs", json.dumps(logs).encode(), "application/json")[0] == 200
    [stored] = query.find_spans(box.dir)
    assert stored["name"] == "GET /login?token=***" and stored["attributes"]["auth"] == "Bearer ***"
    [rec] = query.trace_logs(box.dir, "ab" * 16)
    assert rec["msg"] == "login with ***" and rec["attributes"] == {"token": "***"} and rec["level"] == "error"
    on_disk = b"".join(p.read_bytes() for p in box.dir.rglob("*.jsonl*"))
    assert b"s3cr3t" not in on_disk


def test_ge_pattern_matches_exactly_the_numbers_at_least_n():
    import re

    rng = random.Random(3)
    for n in [0, 1, 9, 10, 99, 100, 109, 200_000_000, 999_999_999] + [rng.randrange(10 ** rng.randrange(1, 20))
                                                                        for _ in range(300)]:
        rx = re.compile(b"^" + query.ge_pattern(n) + b"$")
        for x in [n, n + 1, max(0, n - 1), n * 10, n // 10] + [rng.randrange(10 ** rng.randrange(1, 21))
                                                               for _ in range(20)]:
            assert bool(rx.match(str(x).encode())) == (x >= n), (n, x)


def test_a_box_claimed_from_the_pool_keeps_its_spans_and_rm_stops_its_receiver(host, make_repo, run_wtbox):
    from worktreebox.fleet import pool as P

    repo = make_repo({"send.py": SEND}, toml=BARE_TOML)
    try:
        P.top_up(host, P.resolve_target(repo), 1)
        [pooled] = [b for b in host.list() if b.pool]
        pid = traces_resource.receiver_pid(pooled)
        assert pid
        out = json.loads(run_wtbox("new", "claimed", "--repo", str(repo), "--json").stdout)
        assert out["from_pool"] is True and out["traces"]["up"]
        assert host.get(out["id"]).env["OTEL_RESOURCE_ATTRIBUTES"] == f"wtbox.box={out['id']}"
        sent = set(run_wtbox("exec", out["id"], "--", sys.executable, "send.py", "2").stdout.split())
        got = json.loads(run_wtbox("traces", out["id"], "--json").stdout)
        assert {s["trace_id"] for s in got} == sent and len(sent) == 2
        run_wtbox("rm", out["id"])
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert not (host.boxes_dir / out["id"]).exists() and not (host.boxes_dir / pooled.id).is_symlink()
    finally:
        P.stop_filler(host, str(repo))


def test_box_traces_is_an_mcp_tool(host, make_repo, wtbox_home):
    import anyio
    from mcp_helpers import ok, stdio_client

    box = host.new("mcptr", repo=make_repo(toml=BARE_TOML))
    url = box.data["traces"]["url"]
    tid = "ab" * 16
    assert post(url + "/v1/traces", json_span(tid, "cd" * 8, "GET /slow"), "application/json")[0] == 200

    async def main():
        async with stdio_client(wtbox_home) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert {"min_duration", "trace_id", "logs", "limit"} <= set(tools["box_traces"].input_schema["properties"])
            spans = ok(await client.call_tool("box_traces", {"box": box.id, "min_duration": "400ms"}))
            assert [(s["trace_id"], s["name"], s["duration_ms"]) for s in spans] == [(tid, "GET /slow", 420.0)]
            assert ok(await client.call_tool("box_traces", {"box": box.id, "min_duration": "1s"})) == []
            tree = ok(await client.call_tool("box_traces", {"box": box.id, "trace_id": tid[:8], "logs": True}))
            assert tree["trace_id"] == tid and tree["spans"][0]["depth"] == 0 and tree["logs"] == []

    anyio.run(main)
