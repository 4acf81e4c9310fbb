"""The docker providers: the host's PostgreSQL and each box's VictoriaMetrics as containers.

Skipped with the reason when no Docker daemon answers, or when the local images cannot be
built (no registry is reachable from our machines: scripts/build_images.sh builds them from
Debian packages, cached by recipe hash, ~80 s cold and ~0.2 s warm). Real containers,
real PostgreSQL, real VictoriaMetrics; every test removes what it made.
"""
from __future__ import annotations

import http.server
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import APPS, ROOT, wait_for

from worktreebox.errors import WtboxError
from worktreebox.providers import docker_engine as dockerenv

_OK, _WHY = dockerenv.docker_available()
if _OK and importlib.util.find_spec("testcontainers") is None:
    _OK, _WHY = False, "testcontainers is not installed (pip install -e '.[test]')"
pytestmark = pytest.mark.skipif(not _OK, reason=f"Docker is not available: {_WHY}")
# Ports of these tests: away from other suites' leases (they start at 20000).
PORT_RANGE = "27000-27999"


@pytest.fixture(scope="session")
def images() -> dict[str, str]:
    """Build (or find cached) the local images; skip the docker tests when that is impossible."""
    try:
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "build_images.sh")], capture_output=True,
                              text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip("the docker images did not build within 15 minutes")
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"the docker images are not built and could not be built: {last}")
    names = dict(line.split("=", 1) for line in proc.stdout.split() if "=" in line)
    return {"postgres": names["WTBOX_POSTGRES_IMAGE"], "vm": names["WTBOX_VICTORIAMETRICS_IMAGE"]}


@pytest.fixture
def docker_env(images, wtbox_home, monkeypatch):
    """The docker providers selected through the environment, as a user would."""
    monkeypatch.delenv("WTBOX_POSTGRES_URL", raising=False)
    monkeypatch.setenv("WTBOX_DATABASE_PROVIDER", "docker")
    monkeypatch.setenv("WTBOX_OBSERVABILITY_PROVIDER", "docker")
    monkeypatch.setenv("WTBOX_POSTGRES_IMAGE", images["postgres"])
    monkeypatch.setenv("WTBOX_VICTORIAMETRICS_IMAGE", images["vm"])
    monkeypatch.setenv("WTBOX_PORT_RANGE", PORT_RANGE)
    yield images
    # Whatever a test left: this home's labelled containers, volumes and networks.
    if dockerenv.docker_available()[0]:
        c = dockerenv.client()
        for kind, objs in dockerenv.find_labelled(wtbox_home, c=c).items():
            for obj in objs:
                try:
                    obj.remove(force=True, v=True) if kind == "containers" else obj.remove()
                except Exception:
                    pass


@pytest.fixture
def pg(docker_env, host):
    """The host's docker PostgreSQL, destroyed (container, volume, password) at the end."""
    from worktreebox.providers.postgres import docker as dp

    yield dp
    dp.destroy(host)


def _labelled(home: Path, box_id: str | None = None) -> dict[str, list[str]]:
    found = dockerenv.find_labelled(home, box_id)
    return {k: sorted(o.name for o in v) for k, v in found.items()}


def _sql(url: str, query: str, params: tuple = ()) -> list[tuple]:
    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        cur = conn.execute(query, params or None)
        return cur.fetchall() if cur.description else []


# ---------------------------------------------------------------- PostgreSQL container

def test_postgres_container_superuser(pg, host):
    t0 = time.perf_counter()
    info = pg.start(host)
    cold = time.perf_counter() - t0
    url = pg.superuser_url(host)
    assert info["host"] == "127.0.0.1" and 27000 <= info["port"] <= 27999
    assert _sql(url, "SELECT current_user, current_database()") == [("postgres", "wtbox")]

    # The password lives only in the 0600 state file, never in status.
    state = host.home / "postgres-docker.json"
    assert state.stat().st_mode & 0o777 == 0o600
    assert json.loads(state.read_text())["password"] == info["password"]
    st = pg.status(host)
    assert st["running"] and st["port"] == info["port"]
    assert info["password"] not in json.dumps(st)

    # Labelled as a host-level thing of this home, published on loopback only, scram over TCP.
    c = dockerenv.client()
    ct = c.containers.get(pg.name(host))
    want = {"wtbox.home": dockerenv.home_hash(host.home), "wtbox.host": dockerenv.home_hash(host.home)}
    assert want.items() <= ct.labels.items()
    assert "wtbox.box" not in ct.labels
    bindings = ct.attrs["HostConfig"]["PortBindings"]["5432/tcp"]
    assert bindings == [{"HostIp": "127.0.0.1", "HostPort": str(info["port"])}]
    assert want.items() <= c.volumes.get(pg.name(host)).attrs["Labels"].items()
    # No Ryuk: it would remove the container when this process exits.
    assert not [x for x in c.containers.list(all=True) if "ryuk" in x.name]
    import psycopg

    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(url.replace(info["password"], "wrong"), connect_timeout=5).close()

    # Start is idempotent: the same container, fast.
    t0 = time.perf_counter()
    assert pg.start(host)["port"] == info["port"]
    warm = time.perf_counter() - t0
    assert c.containers.get(pg.name(host)).id == ct.id

    # Stop removes the container but keeps the data in the volume.
    _sql(url, "CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)")
    assert pg.stop(host) is True
    assert not pg.status(host)["running"]
    assert pg.stop(host) is False
    t0 = time.perf_counter()
    pg.start(host)
    restart = time.perf_counter() - t0
    assert _sql(url, "SELECT x FROM kept") == [(7,)]
    print(f"\ndocker postgres: first start {cold:.2f}s, reuse {warm * 1000:.0f}ms, restart {restart:.2f}s")

    pg.destroy(host)
    assert _labelled(host.home) == {"containers": [], "volumes": [], "networks": []}
    assert not state.exists()


def test_postgres_concurrent_starts_make_one_container(pg, host):
    from worktreebox.host import Host

    results: list = []
    errors: list = []

    def go() -> None:
        try:
            results.append(pg.start(Host(host.home))["port"])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(set(results)) == 1 and len(results) == 3
    assert _labelled(host.home)["containers"] == [pg.name(host)]


def test_schema_isolation_through_the_superuser_url(pg, host):
    """What the database resource does in schema mode, on the container: boxes cannot see each other."""
    if _docker_database_wired(host):
        pytest.skip("the docker provider is wired: the Host.new isolation test below covers this")
    pg.start(host)
    url = pg.superuser_url(host)
    base = url.rsplit("@", 1)[1]
    boxes = {}
    for name in ("wt_0000aaaa", "wt_0000bbbb"):
        pw = os.urandom(8).hex()
        _sql(url, f"CREATE ROLE {name} LOGIN PASSWORD '{pw}'; CREATE SCHEMA {name} AUTHORIZATION {name};"
                  f"ALTER ROLE {name} SET search_path = {name}, public")
        boxes[name] = f"postgresql://{name}:{pw}@{base}"
    _sql(url, "REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    _sql(boxes["wt_0000aaaa"], "CREATE TABLE secrets (v text); INSERT INTO secrets VALUES ('a')")
    assert _sql(boxes["wt_0000aaaa"], "SELECT v FROM secrets") == [("a",)]
    import psycopg

    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        _sql(boxes["wt_0000bbbb"], "SELECT v FROM wt_0000aaaa.secrets")
    with pytest.raises(psycopg.errors.UndefinedTable):
        _sql(boxes["wt_0000bbbb"], "SELECT v FROM secrets")  # its search_path is its own schema
    _sql(url, "DROP SCHEMA wt_0000aaaa CASCADE; DROP ROLE wt_0000aaaa")
    assert _sql(url, "SELECT rolname FROM pg_roles WHERE rolname LIKE 'wt_0000%' ORDER BY 1") == [("wt_0000bbbb",)]


def _docker_database_wired(host) -> bool:
    from worktreebox.providers import postgres

    try:
        return postgres.server(host).provider == "docker"
    except WtboxError:
        return False


def test_docker_database_provider_isolation_and_teardown(pg, host, make_repo, monkeypatch):
    """Host.new with [database] provider docker: schema isolation and teardown by the shared code."""
    from worktreebox.providers import postgres
    from worktreebox.providers.postgres import docker as docker_postgres

    if not _docker_database_wired(host):
        # Until Host wires the provider in, apply exactly the wiring the report asks for.
        native = postgres.server
        monkeypatch.setattr(postgres, "server", lambda h: docker_postgres.DockerServer(h)
                            if h.config.database_provider == "docker" else native(h))
    repo = make_repo(toml='[database]\nmode = "schema"\n[observability]\nenabled = false\n')
    a = host.new("iso-a", repo=repo)
    b = host.new("iso-b", repo=repo)
    assert a.data["database"]["provider"] == "docker"
    url_a, url_b = a.data["database"]["url"], b.data["database"]["url"]  # as the host reaches them
    assert f":{host.registry.ports_of('@postgres-docker')['postgres-docker']}/" in url_a
    _sql(url_a, "CREATE TABLE t (v int); INSERT INTO t VALUES (1)")
    import psycopg

    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        _sql(url_b, f"SELECT v FROM {a.pg_name}.t")
    su = docker_postgres.superuser_url(host)
    host.rm(a.id, force=True)
    assert _sql(su, "SELECT count(*) FROM pg_roles WHERE rolname = %s", (a.pg_name,)) == [(0,)]
    assert _sql(su, "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (a.pg_name,)) == [(0,)]
    assert _sql(su, "SELECT count(*) FROM pg_roles WHERE rolname = %s", (b.pg_name,)) == [(1,)]
    host.rm(b.id, force=True)
    # The host's container outlives its boxes.
    assert docker_postgres.status(host)["running"]


def test_postgres_port_conflict_is_one_sentence(pg, host):
    port = host.lease_host_port(pg.PORT_OWNER)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
        with pytest.raises(WtboxError, match=f"Port {port} on 127.0.0.1 is already in use"):
            pg.start(host)
    assert _labelled(host.home)["containers"] == []


def test_missing_image_is_one_sentence(pg, host, monkeypatch):
    monkeypatch.setenv("WTBOX_POSTGRES_IMAGE", "local/wtbox-no-such-image:0")
    host._config = None
    with pytest.raises(WtboxError, match="image 'local/wtbox-no-such-image:0' is not on this machine") as e:
        pg.start(host)
    assert "\n" not in str(e.value)
    assert _labelled(host.home)["containers"] == []


def test_docker_unavailable_is_one_sentence(pg, host, monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    ok, why = dockerenv.docker_available()
    assert not ok and "does not exist" in why
    with pytest.raises(WtboxError, match="Docker is not running"):
        pg.start(host)
    from worktreebox.cli.commands.doctor import docker_report

    r = docker_report(host)
    assert r["available"] is False and r["providers"] == {"database": False, "observability": False}
    assert r["ok"] is False  # a docker provider is configured but cannot work
    # rm and gc of native boxes must not fail on a host without Docker.
    assert dockerenv.sweep_box(host.home, "x-00000000") == {"containers": 0, "volumes": 0, "networks": 0}
    assert dockerenv.discover_box_ids(host.home) == set()


def test_testcontainers_configuration(tmp_path):
    """No Ryuk ever; inside a container with a local dockerd, connect to published ports on 127.0.0.1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TESTCONTAINERS_", "TC_"))}
    code = ("import json, os\nfrom worktreebox.providers import docker_engine as dockerenv\n"
            "cfg = dockerenv.testcontainers()\n"
            "print(json.dumps([cfg.ryuk_disabled, str(cfg.connection_mode_override), cfg.tc_host_override,"
            " dockerenv.inside_container(), dockerenv.daemon_is_local()]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    ryuk_off, mode, tc_host, inside, local = json.loads(out)
    assert ryuk_off is True
    if inside and local:
        assert (mode, tc_host) == ("ConnectionMode.docker_host", "127.0.0.1")
    elif inside:
        assert mode == "ConnectionMode.bridge_ip"
    else:
        assert mode == "None"  # testcontainers' own default (docker host) is right outside containers


# ---------------------------------------------------------------- VictoriaMetrics container

class _App(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"# TYPE app_hits_total counter\napp_hits_total 42\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def app_port():
    """A service on the host with /metrics, as a box would run it."""
    srv = http.server.HTTPServer(("127.0.0.1", 0), _App)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def _query(url: str, q: str) -> list:
    with urllib.request.urlopen(f"{url}/api/v1/query?nocache=1&query={urllib.request.quote(q)}", timeout=5) as r:
        return json.load(r)["data"]["result"]




def test_victoriametrics_container_scrapes_the_box(docker_env, host, app_port):
    from worktreebox.box import Box
    from worktreebox.providers.metrics import docker as docker_metrics

    box = Box(id="vm-test-0000cccc", task="vm-test", repo="", branch="wtbox/vm-test-0000cccc",
              dir=host.boxes_dir / "vm-test-0000cccc")
    box.run_dir.mkdir(parents=True)
    scrape = box.run_dir / "scrape.yml"
    scrape.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n- job_name: web\n  static_configs:\n"
                      f"  - targets: ['127.0.0.1:{app_port}']\n")
    port = host.lease_host_port(box.id)
    t0 = time.perf_counter()
    url = docker_metrics.start(box, port, scrape, host=host)
    took = time.perf_counter() - t0
    assert url == f"http://127.0.0.1:{port}"
    with urllib.request.urlopen(url + "/health", timeout=5) as r:
        assert r.read().strip() == b"OK"
    # It reaches the box's service on the host (VictoriaMetrics makes new series searchable only
    # ~10 s later, natively too; the scrape result on /targets shows the same thing at once).
    def scraped():
        with urllib.request.urlopen(url + "/api/v1/targets", timeout=5) as r:
            t = json.load(r)["data"]["activeTargets"]
        return t and t[0]["health"] == "up" and t[0]["lastSamplesScraped"] == 1 and t
    targets = wait_for(scraped, timeout=15, every=0.1)
    assert targets and targets[0]["labels"] == {"instance": f"127.0.0.1:{app_port}", "job": "web"}
    assert _query(url, "vector(42)")[0]["value"][1] == "42"
    assert docker_metrics.status(box, home=host.home)["running"]
    # Labelled with the box, so rm and gc find it.
    assert dockerenv.labelled_box_ids(host.home) == {box.id}
    assert _labelled(host.home, box.id) == {"containers": [docker_metrics.name(box.id)],
                                            "volumes": [docker_metrics.name(box.id)], "networks": []}
    # Idempotent start: the running container is kept.
    assert docker_metrics.start(box, port, scrape, host=host) == url
    print(f"\ndocker victoria-metrics: start {took:.2f}s")
    # What rm and gc call (plain HTTP on the socket, no docker SDK import).
    assert dockerenv.discover_box_ids(host.home) == {box.id}
    assert dockerenv.sweep_box(host.home, box.id) == {"containers": 1, "volumes": 1, "networks": 0}
    assert _labelled(host.home) == {"containers": [], "volumes": [], "networks": []}
    assert dockerenv.discover_box_ids(host.home) == set()
    assert docker_metrics.stop(box) == {"containers": 0, "volumes": 0, "networks": 0}


def test_victoriametrics_port_taken_is_one_sentence(docker_env, host):
    from worktreebox.box import Box
    from worktreebox.providers.metrics import docker as docker_metrics

    box = Box(id="vm-busy-0000dddd", task="vm-busy", repo="", branch="x", dir=host.boxes_dir / "vm-busy-0000dddd")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(WtboxError, match=f"Port {port} on 127.0.0.1 is already in use"):
            docker_metrics.start(box, port, None, host=host, timeout=20)
    assert _labelled(host.home) == {"containers": [], "volumes": [], "networks": []}


# ---------------------------------------------------------------- through Host and the CLI (once wired)

OBS_TOML = """
[box]
ports = ["web"]
[database]
mode = "schema"
[services.web]
cmd = "{py} {app} {{{{ ports.web }}}}"
ready = "http://127.0.0.1:{{{{ ports.web }}}}/health"
metrics = "http://127.0.0.1:{{{{ ports.web }}}}/metrics"
"""


def _wired_metrics(host, make_repo) -> bool:
    from worktreebox import providers

    return "docker" in providers.names("metrics")


def test_wtbox_metrics_on_a_docker_box(docker_env, host, make_repo, run_wtbox):
    if not _docker_database_wired(host) or not _wired_metrics(host, make_repo):
        pytest.skip("the docker providers are not wired into the database/metrics resources yet")
    app = APPS / "metrics_app.py"
    repo = make_repo(toml=OBS_TOML.format(py=sys.executable, app=app))
    out = json.loads(run_wtbox("new", "dm", "--repo", str(repo), "--json").stdout)
    box_id = out["id"]
    try:
        assert dockerenv.labelled_box_ids(host.home) == {box_id}
        url = host.get(box_id).data["metrics"]["url"]

        def scraped():  # the container reaches the box's service on the host
            with urllib.request.urlopen(url + "/api/v1/targets", timeout=5) as r:
                t = json.load(r)["data"]["activeTargets"]
            return t and all(x["health"] == "up" for x in t)
        assert wait_for(scraped, timeout=20, every=0.2)
        # `wtbox metrics` queries the container (new series are searchable only after ~10 s: a constant here).
        r = run_wtbox("metrics", box_id, "vector(42)", "--json")
        assert '"42"' in r.stdout
    finally:
        run_wtbox("rm", "--force", box_id)
    assert _labelled(host.home, box_id) == {"containers": [], "volumes": [], "networks": []}


def test_gc_after_kill9_of_new_leaves_no_labelled_thing(docker_env, host, make_repo, run_wtbox, wtbox_home):
    if not _docker_database_wired(host) or not _wired_metrics(host, make_repo):
        pytest.skip("the docker providers are not wired into the database/metrics resources yet")
    from worktreebox.providers.postgres import docker as docker_postgres

    docker_postgres.start(host)  # the host-level container, which gc must keep
    app = APPS / "metrics_app.py"
    repo = make_repo(toml=OBS_TOML.format(py=sys.executable, app=app))
    env = {**os.environ, "WTBOX_HOME": str(wtbox_home), "WTBOX_NO_AUTO_GC": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "worktreebox.cli.main", "new", "killed", "--repo", str(repo)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # Kill as soon as the box owns a container: mid-way through `new`.
        assert wait_for(lambda: dockerenv.discover_box_ids(wtbox_home), timeout=60, every=0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    ids = dockerenv.labelled_box_ids(wtbox_home)
    assert len(ids) == 1
    r = run_wtbox("gc", "--grace", "0s", "--json", check=False)
    assert r.returncode == 0, r.stdout + r.stderr  # (gc's own account of a failed action is in its JSON)
    for box_id in ids:
        assert _labelled(wtbox_home, box_id) == {"containers": [], "volumes": [], "networks": []}
    # The host's PostgreSQL is host-level: gc keeps it.
    assert docker_postgres.status(host)["running"]


def test_a_backing_service_as_a_container(images, wtbox_home, make_repo, run_wtbox, monkeypatch):
    """[backing.*] with runtime = "docker": the declared image, published on the box's port, labelled,
    removed with the box (local/wtbox-redis:7 is built by scripts/build_images.sh from Debian's redis)."""
    from helpers import redis_cmd

    if not dockerenv.image_present("local/wtbox-redis:7"):
        pytest.skip("scripts/build_images.sh did not build local/wtbox-redis:7")
    toml = ('[database]\nmode = "none"\n[observability]\nenabled = false\n'
            '[backing.cache]\nimage = "local/wtbox-redis:7"\nkind = "redis"\nruntime = "docker"\n')
    repo = make_repo(toml=toml)
    env = {"WTBOX_PORT_RANGE": PORT_RANGE}
    box = json.loads(run_wtbox("new", "dk", "--repo", str(repo), "--json", env=env).stdout)
    port = box["ports"]["cache"]
    assert {r["name"]: (r["runtime"], r["up"]) for r in box["backing"]} == {"cache": ("docker", True)}
    assert redis_cmd(port, "PING") == b"+PONG\r\n"
    found = dockerenv.find_labelled(wtbox_home, box["id"], c=dockerenv.client())["containers"]
    assert len(found) == 1
    run_wtbox("rm", "--force", box["id"], env=env)
    assert dockerenv.find_labelled(wtbox_home, box["id"], c=dockerenv.client())["containers"] == []
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize("way", ["engine API", "SDK"])
def test_two_sweeps_of_one_box_at_once_both_succeed(images, wtbox_home, monkeypatch, way):
    """A box's metrics store and backing services are removed in parallel (Host._destroy), and each
    provider sweeps every container of the box: the second DELETE of one container got "removal
    ... is already in progress" (409), and gc reported the box's removal incomplete (CI failed so).
    Both ways a sweep goes: the Engine API on the local socket, the SDK where there is none."""
    if way == "SDK":
        monkeypatch.setattr(dockerenv, "_socket_path", lambda: None)
    c = dockerenv.client()
    box_id = "swept-0000cafe"
    labels = dockerenv.labels(wtbox_home, box_id)
    for i in range(3):
        volume = c.volumes.create(labels=labels)
        c.containers.run(images["vm"], entrypoint=["sleep", "60"], labels=labels, detach=True,
                         volumes={volume.name: {"bind": f"/data{i}", "mode": "rw"}})
    errors: list[BaseException] = []

    def sweep() -> None:
        try:
            dockerenv.sweep_box(wtbox_home, box_id)
        except BaseException as e:  # reported below
            errors.append(e)

    try:
        threads = [threading.Thread(target=sweep) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert dockerenv.find_labelled(wtbox_home, box_id, c=c) == {"containers": [], "volumes": [], "networks": []}
    finally:
        for kind, objs in dockerenv.find_labelled(wtbox_home, box_id, c=c).items():
            for obj in objs:
                obj.remove(force=True, v=True) if kind == "containers" else obj.remove()
