"""Per-box observability with a real VictoriaMetrics: scraping, wtbox's own series, probe, isolation, rm."""
from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from helpers import APPS, ROOT, port_bindable, wait_for

from worktreebox.providers.metrics import native as vm
from worktreebox.telemetry.collector import Collector
from worktreebox.telemetry.exposition import exposition, metric_specs
from worktreebox.telemetry.probe import buckets
from worktreebox.telemetry.vmclient import Client

APP = (APPS / "metrics_app.py").read_text()

WEB_TOML = """
[database]
mode = "none"
[services.web]
cmd = "python3 app.py {{ ports.web }}"
env = { SLEEP_MS = "20" }
ready = "http://127.0.0.1:{{ ports.web }}/fast"
metrics = "http://127.0.0.1:{{ ports.web }}/metrics"
"""
# A box with its metrics store but no services: the cheapest box that has observability.
BARE_TOML = """
[database]
mode = "none"
"""

pytestmark = pytest.mark.skipif(shutil.which("victoria-metrics") is None,
                                reason="victoria-metrics is not installed (Debian package victoria-metrics)")




def client(box) -> Client:
    return Client(box.data["metrics"]["url"], box_id=box.id)


def series(box, query: str) -> list[dict]:
    return client(box).query(query)["result"]


def bucket_index(seconds: float) -> int:
    edges = buckets()
    return next((i for i, le in enumerate(edges) if seconds <= le), len(edges))


@pytest.fixture(autouse=True)
def own_port_range(monkeypatch):
    """Leases are per home: test homes of parallel runs would otherwise all start at the bottom of
    the default range and race for the same ports. A random block keeps these tests out of that."""
    lo = random.randrange(21000, 29000, 100)
    monkeypatch.setenv("WTBOX_PORT_RANGE", f"{lo}-{lo + 99}")


@pytest.fixture
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def store(tmp_path, free_port):
    """A VictoriaMetrics for a hand-made box dir, stopped at the end."""
    box_id = "unit-0badc0de"
    vm.start(box_id, port=free_port, data_dir=tmp_path / "metrics", run_dir=tmp_path / "run")
    yield box_id, f"http://127.0.0.1:{free_port}", tmp_path
    vm.stop(box_id, run_dir=tmp_path / "run")


# ---------------------------------------------------------------- through the Host and the CLI


def test_service_metrics_own_series_probe_and_logs(host, make_repo, run_wtbox):
    repo = make_repo({"app.py": APP}, toml=WEB_TOML)
    box = host.new("obs", repo=repo)
    assert box.env["WTBOX_METRICS_URL"] == f"http://127.0.0.1:{box.inside_ports['metrics']}"  # what the box sees
    assert box.env["WTBOX_PROMETHEUS_REMOTE_WRITE_URL"] == box.env["WTBOX_METRICS_URL"] + "/api/v1/write"

    # The service's own /metrics, scraped with box and service labels (every 5 s).
    assert wait_for(lambda: series(box, 'up{service="web"} == 1'))
    out = json.loads(run_wtbox("metrics", box.id, "up", "--json").stdout)
    assert out["resultType"] == "vector"
    [up] = out["result"]
    assert up["metric"]["box"] == box.id and up["metric"]["service"] == "web" and up["value"][1] == "1"
    # The app claims box="spoofed": the box's own label wins, the app's is kept as exported_box.
    human = wait_for(lambda: run_wtbox("metrics", box.id, "demo_info").stdout, timeout=5)
    assert 'exported_box="spoofed"' in human and 'service="web"' in human
    assert wait_for(lambda: "demo_hits_total" in run_wtbox("metrics", box.id, "--list").stdout)

    # Log records are counted per level, incrementally: three failing requests → three errors.
    for _ in range(3):
        p = run_wtbox("probe", box.id, "/fail", "-n", "1", "--json", check=False)
        assert json.loads(p.stdout)["errors"] == 1

    # probe: printed p95 and histogram_quantile(0.95) over the recorded histogram share a bucket (±1).
    res = json.loads(run_wtbox("probe", box.id, "/", "-n", "200", "-c", "4", "--json").stdout)
    assert res["recorded"] and res["answered"] == 200 and res["errors"] == 0 and res["codes"] == {"200": 200}
    assert res["p50_ms"] <= res["p95_ms"] <= res["p99_ms"] <= res["max_ms"]
    assert 5 < res["p95_ms"] < 1000  # the app sleeps up to 20 ms
    q = 'histogram_quantile(0.95, wtbox_probe_duration_seconds_bucket{path="/"})'
    [hq] = json.loads(run_wtbox("metrics", box.id, q, "--json").stdout)["result"]
    quantile = float(hq["value"][1])
    assert abs(bucket_index(quantile) - bucket_index(res["p95_ms"] / 1000)) <= 1, (quantile, res["p95_ms"])
    [count] = series(box, 'wtbox_probe_duration_seconds_count{path="/"}')
    assert count["value"][1] == "200" and count["metric"]["box"] == box.id

    # wtbox's own series, pushed by the supervisor every few seconds.
    own = ["wtbox_service_up", "wtbox_service_ready_seconds", "wtbox_service_restarts_total",
           "wtbox_process_cpu_seconds_total", "wtbox_process_resident_memory_bytes"]
    for name in own:
        got = wait_for(lambda: series(box, f'{name}{{service="web"}}'), timeout=12)  # noqa: B023 (called before the loop moves on)
        assert got and got[0]["metric"]["box"] == box.id, name
    assert wait_for(lambda: series(box, 'wtbox_service_up{service="web"} == 1'), timeout=12)
    assert float(series(box, "wtbox_process_resident_memory_bytes")[0]["value"][1]) > 1e6
    assert float(series(box, "wtbox_service_ready_seconds")[0]["value"][1]) > 0

    assert wait_for(lambda: series(box, 'wtbox_log_records_total{service="web",level="error"} >= 3'), timeout=12)
    [errs] = series(box, 'wtbox_log_records_total{service="web",level="error"}')
    assert errs["value"][1] == "3"

    human = run_wtbox("probe", box.id, f"http://127.0.0.1:{box.ports['web']}/fast", "-n", "20")
    assert "p95" in human.stdout and "errors 0" in human.stdout and "recorded" in human.stderr
    ranged = json.loads(run_wtbox("metrics", box.id, "wtbox_service_up", "--range", "5m", "--step", "5s",
                                  "--json").stdout)
    assert ranged["resultType"] == "matrix" and ranged["result"][0]["values"]

    bad = run_wtbox("metrics", box.id, "sum(", check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("wtbox: The query was rejected")
    assert "Traceback" not in bad.stderr
    host.rm(box.id, force=True)


def test_boxes_are_isolated_and_rm_removes_everything(host, make_repo, run_wtbox):
    repo = make_repo(toml=BARE_TOML)
    a, b = host.new("iso-a", repo=repo), host.new("iso-b", repo=repo)
    assert a.ports["metrics"] != b.ports["metrics"]
    for box in (a, b):
        # What an app in the box does: push to $WTBOX_METRICS_URL.
        push = ("import os, urllib.request; urllib.request.urlopen(urllib.request.Request("
                "os.environ['WTBOX_METRICS_URL'] + '/api/v1/import/prometheus', "
                "data=('app_mark{who=\"' + os.environ['WTBOX_ID'] + '\"} 1\\n').encode())).read()")
        run_wtbox("exec", box.id, "--", sys.executable, "-c", push)
        client(box).flush()
    for mine, other in ((a, b), (b, a)):
        got = wait_for(lambda: series(mine, "app_mark"), timeout=5)  # noqa: B023 (called before the loop moves on)
        assert [s["metric"]["who"] for s in got] == [mine.id]
        assert not series(mine, f'{{who="{other.id}"}}')
        assert not series(mine, f'{{box="{other.id}"}}')
    # Inside a box, the one argument is the query.
    assert f'app_mark{{who="{a.id}"}}' in run_wtbox("metrics", "app_mark", cwd=a.path).stdout
    run_wtbox("probe", a.id, f"http://127.0.0.1:{a.ports['metrics']}/health", "-n", "5")
    assert "wtbox_probe_duration_seconds_bucket" in run_wtbox("metrics", a.id, "--list").stdout
    assert "wtbox_probe_duration_seconds_bucket" not in run_wtbox("metrics", b.id, "--list").stdout

    # rm: the process is gone, its port free and its data deleted.
    pid = int((a.run_dir / vm.PID_FILE).read_text())
    assert psutil.pid_exists(pid) and a.metrics_dir.is_dir() and not port_bindable(a.ports["metrics"])
    run_wtbox("rm", a.id)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert vm.find_processes(a.id) == []
    assert port_bindable(a.ports["metrics"])
    assert not a.metrics_dir.exists() and not a.dir.exists()
    assert series(b, "app_mark")  # the other box is untouched
    gone = run_wtbox("metrics", a.id, "up", check=False)
    assert gone.returncode == 2 and "No box matches" in gone.stderr


def test_destroy_without_pid_file_and_discover(host, make_repo):
    from worktreebox.resources.metrics import Metrics

    box = host.new("orphan", repo=make_repo(toml=BARE_TOML))
    res = Metrics()
    assert box.id in res.discover(host)
    pid = int((box.run_dir / vm.PID_FILE).read_text())
    (box.run_dir / vm.PID_FILE).unlink()  # e.g. a crash between start and writing state
    res.destroy(host, box)  # finds it by WTBOX_ID
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not box.metrics_dir.exists()
    res.destroy(host, box)  # idempotent
    assert box.id not in res.discover(host)
    host.rm(box.id, force=True)


def _path_without_victoria_metrics(tmp_path: Path) -> str:
    """PATH where each dir holding victoria-metrics is replaced by a copy of links to everything else."""
    parts = []
    for i, d in enumerate(os.environ["PATH"].split(os.pathsep)):
        if not (Path(d) / "victoria-metrics").exists():
            parts.append(d)
            continue
        shadow = tmp_path / f"bin{i}"
        shadow.mkdir()
        for entry in os.scandir(d):
            if entry.name != "victoria-metrics":
                (shadow / entry.name).symlink_to(entry.path)
        parts.append(str(shadow))
    return os.pathsep.join(parts)


def test_missing_binary_fails_clearly_and_observability_can_be_off(tmp_path, make_repo, run_wtbox, wtbox_home):
    env = {"PATH": _path_without_victoria_metrics(tmp_path)}
    assert shutil.which("victoria-metrics", path=env["PATH"]) is None and shutil.which("git", path=env["PATH"])
    repo = make_repo(toml=BARE_TOML)
    p = run_wtbox("new", "nobin", "--repo", str(repo), env=env, check=False)
    assert p.returncode == 1, p.stderr
    assert "`victoria-metrics`" in p.stderr and "Debian package `victoria-metrics`" in p.stderr
    assert "enabled = false" in p.stderr and "Traceback" not in p.stderr and p.stderr.count("\n") == 1
    assert json.loads(run_wtbox("ls", "--json").stdout) == []
    assert not any((wtbox_home / "boxes").iterdir())

    off = make_repo(toml=BARE_TOML + "[observability]\nenabled = false\n")
    out = json.loads(run_wtbox("new", "nobin", "--repo", str(off), "--json", env=env).stdout)
    assert "WTBOX_METRICS_URL" not in out["env"] and "metrics" not in out["ports"]
    m = run_wtbox("metrics", out["id"], "up", check=False)
    assert m.returncode == 1 and "enabled = false" in m.stderr
    run_wtbox("rm", out["id"])


# ---------------------------------------------------------------- modules directly


def test_collector_counts_log_records_incrementally(store):
    box_id, url, tmp = store
    logs = tmp / "logs"
    logs.mkdir()
    log = logs / "api.jsonl"
    rec = lambda level: json.dumps({"ts": "t", "service": "api", "stream": "stdout", "level": level, "msg": "m"})
    log.write_text(rec("info") + "\n" + rec("error") + "\n" + rec("info")[:10])  # a half-written last line
    sleeper = subprocess.Popen([sys.executable, "-c", ("import time, subprocess, sys; "
                                "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                                "time.sleep(60)")])
    try:
        c = Collector(box_id, url, logs)
        svc = {"name": "api", "pids": [sleeper.pid], "up": True, "ready_seconds": 0.25, "restarts": 2}
        c.tick([svc])
        with open(log, "a") as f:
            f.write(rec("info")[10:] + "\n" + rec("warning") + "\n")
        wait_for(lambda: len(psutil.Process(sleeper.pid).children()) == 1, timeout=5)
        c.tick([svc])
        vmc = Client(url)
        vmc.flush()
        counts = {s["metric"]["level"]: s["value"][1] for s in vmc.query("wtbox_log_records_total")["result"]}
        assert counts == {"info": "2", "error": "1", "warning": "1"}
        rss = vmc.query("wtbox_process_resident_memory_bytes")["result"][0]
        # Summed over the tree: two Python processes, each well over 5 MB.
        assert float(rss["value"][1]) > 2 * 5e6 and rss["metric"] == {
            "__name__": "wtbox_process_resident_memory_bytes", "box": box_id, "service": "api"}
        assert vmc.query("wtbox_service_restarts_total")["result"][0]["value"][1] == "2"

        log.write_text(rec("error") + "\n")  # truncated (rotated): counting starts over in the new file
        c.tick([svc])
        vmc.flush()
        counts = {s["metric"]["level"]: s["value"][1] for s in vmc.query("wtbox_log_records_total")["result"]}
        assert counts["error"] == "2"
    finally:
        for p in [*psutil.Process(sleeper.pid).children(recursive=True), psutil.Process(sleeper.pid)]:
            p.kill()
        sleeper.wait()


def test_metric_names_live_in_one_place():
    specs = metric_specs()
    assert {"wtbox_service_up", "wtbox_service_ready_seconds", "wtbox_service_restarts_total",
            "wtbox_process_cpu_seconds_total", "wtbox_process_resident_memory_bytes", "wtbox_log_records_total",
            "wtbox_probe_duration_seconds", "wtbox_span_duration_seconds", "wtbox_span_errors_total",
            "wtbox_browser_console_errors_total", "wtbox_browser_failed_requests_total",
            "wtbox_browser_page_load_seconds",
            "wtbox_box_cpu_seconds_total", "wtbox_box_memory_bytes",
            "wtbox_box_memory_peak_bytes", "wtbox_box_pids", "wtbox_box_io_read_bytes_total",
            "wtbox_box_io_write_bytes_total", "wtbox_box_oom_kills_total", "wtbox_net_fault"} == set(specs)

    for name, spec in specs.items():
        assert spec["type"] in ("gauge", "counter", "histogram") and spec["help"] and "box" in spec["labels"]
        assert name.endswith("_total") == (spec["type"] == "counter")
    c = Collector("x-00000000", "http://127.0.0.1:9", "/nonexistent")
    pushed = {n for n, _, _ in c.samples([{"name": "s", "pids": [os.getpid()], "up": True, "ready_seconds": 1.0,
                                           "restarts": 0}])}
    assert pushed <= set(specs)
    text = exposition([("wtbox_probe_duration_seconds_bucket", {"box": "b", "path": '/a"b', "le": "0.1"}, 3)])
    assert "# TYPE wtbox_probe_duration_seconds histogram" in text and 'path="/a\\"b"' in text
    edges = buckets()
    assert edges == sorted(edges) and 0.2 in edges


def test_scrape_config_is_accepted_by_victoria_metrics(tmp_path):
    from worktreebox.config.load import parse_repo_config
    from worktreebox.resources.metrics import render_scrape_config, scrape_targets

    cfg = parse_repo_config("""
[box]
ports = ["web", "api"]
[services.web]
cmd = "x"
metrics = "http://127.0.0.1:{{ ports.web }}/metrics"
[services.api]
cmd = "y"
metrics = "https://localhost:{{ ports.api }}/internal/stats?format=prometheus&box={{ box.id }}"
[services.worker]
cmd = "z"
""", "wtbox.toml")
    targets = scrape_targets(cfg.services, facts={"ports": {"web": 20000, "api": 20001}, "box": {"id": "b-1"}})
    assert [t["service"] for t in targets] == ["web", "api"]
    assert targets[1]["params"] == {"format": ["prometheus"], "box": ["b-1"]}
    assert targets[1]["path"] == "/internal/stats"
    path = tmp_path / "scrape.yml"
    path.write_text(render_scrape_config("b-1", targets))
    text = path.read_text()
    assert '"127.0.0.1:20000"' in text and 'service: "api"' in text and 'box: "b-1"' in text
    check = subprocess.run([vm.find_binary(), f"-promscrape.config={path}", "-promscrape.config.dryRun"],
                           capture_output=True, text=True, timeout=20)
    assert check.returncode == 0, check.stderr

    from worktreebox.errors import ConfigError

    cfg.services["web"].metrics = "{{ ports.nope }}"
    with pytest.raises(ConfigError, match=r"\[services.web\] metrics"):
        scrape_targets(cfg.services, facts={"ports": {}, "box": {}})


@pytest.mark.slow
def test_start_failure_is_one_sentence(tmp_path, free_port):
    from worktreebox.errors import WtboxError

    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port))
        s.listen()
        with pytest.raises(WtboxError, match="exited at start"):
            vm.start("busy-00000000", port=free_port, data_dir=tmp_path / "m", run_dir=tmp_path / "run")
    vm.stop("busy-00000000", run_dir=tmp_path / "run")
    assert vm.find_processes("busy-00000000") == []


def test_the_readmes_headline_query_answers_after_the_first_probe(host, make_repo, run_wtbox):
    """Defect 16: the README's metrics query (a rate over the probe histogram) answered "no series match"
    after the first probe and worked only after a second: one sample per series has no rate."""
    import re

    readme = (ROOT / "README.md").read_text()
    query = re.search(r"wtbox metrics fix-login '(histogram_quantile\(0\.95, sum\(rate\(wtbox_probe[^']*)'",
                      readme).group(1)
    box = host.new("headline", repo=make_repo({"app.py": APP}, toml=WEB_TOML))
    run_wtbox("probe", box.id, "/", "-n", "20")
    [row] = json.loads(run_wtbox("metrics", box.id, query, "--json").stdout)["result"]
    assert 0 < float(row["value"][1]) < 1
