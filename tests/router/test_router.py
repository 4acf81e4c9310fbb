"""The host router: a real Caddy (Debian's) in front of real boxes' services.

Requests go to the router's port on 127.0.0.1 with the box's name in the Host header, as a
browser sends them for http://<service>.<box>.localhost:<port>/ (test_router_browser.py does
the same with a real Chromium). The route table itself is pure logic and is tested on Box
objects alone.
"""
from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import wait_for
from router_helpers import caddy_pid, router_toml

from worktreebox.box import CREATING, READY, REMOVING, Box
from worktreebox.router import caddy, routes
from worktreebox.router.state import Paths, read_state
from worktreebox.system import procs

needs_caddy = pytest.mark.skipif(not shutil.which("caddy"), reason="the Debian package caddy is not installed")


def get(port: int, host: str, path: str = "/", headers: dict | None = None) -> tuple[int, str]:
    """One request to the router on 127.0.0.1:`port`, as a browser sends it for http://`host`:`port`/."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": f"{host}:{port}", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def router_port(home: Path) -> int:
    return read_state(home)["port"]


# ---------------------------------------------------------------- the route table (pure)

def _box(box_id: str, ports: dict[str, int], *, state: str = READY, pool: str | None = None,
         first: str | None = None, created_at: float = 1000.0) -> Box:
    env = {"PORT": str(ports[first])} if first else {}
    return Box(id=box_id, task=box_id.rsplit("-", 1)[0], repo="/r", branch=f"wtbox/{box_id}", dir=Path("/x") / box_id,
               state=state, ports=ports, env=env, pool=pool, created_at=created_at)


def test_route_table_names_services_and_what_is_left_out():
    boxes = [
        _box("fix-login-0000000a", {"web": 20001, "api_v2": 20002, "metrics": 20003}, first="web"),
        _box("twin-0000000c", {"web": 20021}, first="web", created_at=2000.0),
        _box("twin-0000000b", {"web": 20011}, first="web", created_at=3000.0),
        _box("pool-0000000d", {"web": 20031}, pool="key", first="web"),  # waits in the warm pool
        _box("going-0000000e", {"web": 20041}, state=REMOVING, first="web"),
        _box("born-0000000f", {"api": 20051, "web": 20050}, state=CREATING, first="api"),
        _box("quiet-00000010", {}),
    ]
    table = {(r.box_id, r.service): r for r in routes.table(boxes)}
    assert set(table) == {("born-0000000f", "api"), ("born-0000000f", "web"), ("fix-login-0000000a", "web"),
                          ("fix-login-0000000a", "api_v2"), ("twin-0000000b", "web"), ("twin-0000000c", "web")}
    web = table[("fix-login-0000000a", "web")]
    assert web.first and web.port == 20001
    assert set(web.hosts) == {"web.fix-login-0000000a.localhost", "web.fix-login.localhost",
                              "fix-login-0000000a.localhost", "fix-login.localhost"}
    # A port name with '_' becomes a DNS label with '-'; only the first port answers to the bare name.
    assert set(table[("fix-login-0000000a", "api_v2")].hosts) == {"api-v2.fix-login-0000000a.localhost",
                                                                   "api-v2.fix-login.localhost"}
    # Two live boxes of one task: the older keeps the task's name (a URL once printed stays good),
    # the younger answers to its id.
    assert set(table[("twin-0000000c", "web")].hosts) == {"web.twin-0000000c.localhost", "web.twin.localhost",
                                                          "twin-0000000c.localhost", "twin.localhost"}
    assert set(table[("twin-0000000b", "web")].hosts) == {"web.twin-0000000b.localhost", "twin-0000000b.localhost"}
    # $PORT decides which port is first, not the name or the number.
    assert table[("born-0000000f", "api")].first and not table[("born-0000000f", "web")].first
    # The same boxes give the same config, byte for byte (so an unchanged set is never pushed again).
    def cfg(bs):
        return routes.encode(routes.caddy_config(routes.table(bs), listen="127.0.0.1", port=1, admin="/s",
                                                 log_file="/l"))
    assert cfg(boxes) == cfg(list(reversed(boxes)))
    assert routes.url(8080, "fix-login", "api_v2") == "http://api-v2.fix-login.localhost:8080/"


def test_list_page_names_boxes_only_and_escapes():
    page = routes.list_page(routes.table([_box("a-0000000a", {"web": 20001}, first="web")]), 9000)
    assert '<a href="http://a.localhost:9000/">a</a>' in page and "20001" not in page
    assert "<li>none</li>" in routes.list_page([], 9000)


# ---------------------------------------------------------------- a real router

@needs_caddy
def test_two_boxes_by_name_unknown_names_get_the_list_and_the_last_rm_stops_it(host, make_repo):
    repo = make_repo(toml=router_toml())
    a = host.new("alpha", repo=repo)
    pid = caddy_pid(host.home)
    assert pid, "the first box with a port starts the router"
    b = host.new("beta", repo=repo)
    assert caddy_pid(host.home) == pid, "a second box is a route, not a restart"
    assert b.data["timings"]["router"] <= 0.020, b.data["timings"]  # route set-up of one box
    port = router_port(host.home)

    for box in (a, b):
        for name in (box.task, box.id):
            page = (f"<!doctype html><html><head><title>box {box.id}</title></head><body>"
                    f"<h1 id='name'>{box.id}</h1></body></html>")
            assert get(port, f"{name}.localhost") == (200, page)
            assert get(port, f"web.{name}.localhost")[0] == 200
    status, page = get(port, "nobody.localhost")
    assert status == 404 and "alpha.localhost" in page and "beta.localhost" in page
    assert str(a.ports["web"]) not in page and str(a.path) not in page  # names only

    # status --json and ls --json carry the URL; the admin API is a unix socket in a 0700 dir.
    assert host.describe(a)["urls"] == {"web": f"http://web.alpha.localhost:{port}/",
                                        "ws": f"http://ws.alpha.localhost:{port}/"}
    paths = Paths(host.home)
    assert paths.socket.is_socket() and (paths.dir.stat().st_mode & 0o777) == 0o700
    assert caddy.config(paths.socket)["admin"]["listen"] == f"unix/{paths.socket}"

    host.rm(b, force=True)
    status, page = get(port, "beta.localhost")
    assert status == 404 and "alpha.localhost" in page and "beta.localhost" not in page
    host.rm(a, force=True)
    wait_for(lambda: not procs.pid_alive(pid), timeout=10)
    assert not procs.pid_alive(pid), "no box needs the router: it stops"
    assert not paths.state.exists()


@needs_caddy
def test_kill_9_of_caddy_and_the_next_command_brings_every_route_back(run_wtbox, make_repo, wtbox_home):
    repo = make_repo(toml=router_toml())
    boxes = [json.loads(run_wtbox("new", t, "--repo", str(repo), "--json").stdout) for t in ("one", "two")]
    pid = caddy_pid(wtbox_home)
    port = router_port(wtbox_home)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not procs.pid_alive(pid), timeout=5)
    with pytest.raises(ConnectionError):  # refused; reset when the dying socket took the connect
        get(port, "one.localhost")
    doctor = json.loads(run_wtbox("doctor", "--json", check=False).stdout)
    line = next(c for c in doctor["checks"] if c["check"] == "router")
    assert not line["ok"] and "not running" in line["detail"]  # doctor tells, and changes nothing

    run_wtbox("ls")  # any command
    assert caddy_pid(wtbox_home) not in (None, pid)
    for box in boxes:
        assert get(port, f"{box['task']}.localhost")[1].count(box["id"]) == 2
    assert json.loads(run_wtbox("ls", "--json").stdout)[0]["url"] == f"http://web.one.localhost:{port}/"
    run_wtbox("rm", "one", "two")
    assert caddy_pid(wtbox_home) is None


def _halted(args: list[str], wtbox_home: Path, stop: str, tmp: Path) -> None:
    """Run `wtbox ARGS` until it reaches phase `stop`, then kill -9 it there."""
    phases = tmp / f"phases-{args[0]}"
    env = {**os.environ, "WTBOX_HOME": str(wtbox_home), "WTBOX_NO_AUTO_GC": "1", "WTBOX_PHASE_STOP": stop,
           "WTBOX_PHASE_FILE": str(phases)}
    proc = subprocess.Popen([sys.executable, "-m", "worktreebox.cli.main", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: phases.exists() and stop in phases.read_text(), timeout=60)
    finally:
        proc.kill()
        proc.wait()


@needs_caddy
def test_kill_9_of_new_and_of_rm_then_gc_leaves_exactly_the_live_routes(run_wtbox, make_repo, wtbox_home, tmp_path):
    repo = make_repo(toml=router_toml())
    run_wtbox("new", "keeper", "--repo", str(repo))
    port = router_port(wtbox_home)
    _halted(["new", "halted", "--repo", str(repo)], wtbox_home, "new:start:services", tmp_path)
    run_wtbox("url", "keeper")  # brings the router in step: the half-made box is routed, its services never came
    assert get(port, "halted.localhost")[0] == 502

    out = json.loads(run_wtbox("gc", "--grace", "0", "--json").stdout)
    assert [a["id"].split("-")[0] for a in out["actions"]] == ["halted"] and out["router"]["routes"] == 2
    status, page = get(port, "halted.localhost")
    assert status == 404 and "keeper.localhost" in page and "halted" not in page

    # rm killed after it took the box's routes away (they go first): with no live box left the
    # router stopped there and then, and gc finishes the box.
    pid = caddy_pid(wtbox_home)
    _halted(["rm", "keeper"], wtbox_home, "destroy:services", tmp_path)
    assert not procs.pid_alive(pid)
    out = json.loads(run_wtbox("gc", "--grace", "0", "--json").stdout)
    assert [a["id"].split("-")[0] for a in out["actions"]] == ["keeper"]
    assert out["router"] == {"running": False, "routes": 0} and caddy_pid(wtbox_home) is None


@needs_caddy
def test_the_first_box_starts_the_router_while_it_is_made_and_a_kill_there_leaves_what_gc_stops(
        run_wtbox, make_repo, wtbox_home, tmp_path):
    """Caddy's start (~50 ms) began only once the box was made, at its routes' push: the first `new`
    after the last box went waited for it. Now it starts beside the box's making; killed there, gc stops it."""
    repo = make_repo(toml=router_toml())
    assert caddy_pid(wtbox_home) is None
    _halted(["new", "early", "--repo", str(repo)], wtbox_home, "new:created", tmp_path)  # before any start
    assert wait_for(lambda: caddy_pid(wtbox_home) is not None, timeout=10)
    pid = caddy_pid(wtbox_home)
    out = json.loads(run_wtbox("gc", "--grace", "0", "--json").stdout)
    assert [a["id"].split("-")[0] for a in out["actions"]] == ["early"]
    assert out["router"] == {"running": False, "routes": 0} and not procs.pid_alive(pid)


@needs_caddy
def test_url_open_and_bad_input(run_wtbox, make_repo, wtbox_home):
    repo = make_repo(toml=router_toml())
    run_wtbox("new", "fix-login", "--repo", str(repo))
    port = router_port(wtbox_home)
    assert run_wtbox("url", "fix-login").stdout == f"http://web.fix-login.localhost:{port}/\n"
    out = json.loads(run_wtbox("url", "fix-login", "ws", "--json").stdout)
    assert out["url"] == f"http://ws.fix-login.localhost:{port}/" and out["router"]["port"] == port
    assert "token" not in out and "token_needed" not in out
    bad = run_wtbox("url", "fix-login", "nope", check=False)
    assert bad.returncode == 2 and bad.stderr == "wtbox: fix-login-" + out["id"].rsplit("-", 1)[1] + \
        " has no service port 'nope'; its ports: web, ws.\n"
    missing = run_wtbox("url", "nobody", check=False)
    assert missing.returncode == 2 and "No box matches 'nobody'" in missing.stderr
    # open: $BROWSER gets the URL; without a browser the URL is printed all the same.
    opened = json.loads(run_wtbox("open", "fix-login", "--json", env={"BROWSER": "true"}).stdout)
    assert opened["opened_with"] == "true" and opened["url"] == f"http://web.fix-login.localhost:{port}/"
    plain = run_wtbox("open", "fix-login", env={"BROWSER": "", "DISPLAY": "", "WAYLAND_DISPLAY": ""})
    assert plain.stdout == f"http://web.fix-login.localhost:{port}/\n"
    assert f"ssh -L {port}:127.0.0.1:{port}" in plain.stderr
    run_wtbox("rm", "fix-login")


@needs_caddy
def test_router_off_and_config_errors(run_wtbox, make_repo, wtbox_home):
    wtbox_home.mkdir(parents=True)
    (wtbox_home / "config.toml").write_text("[host]\nrouter = false\n")
    repo = make_repo(toml=router_toml())
    box = json.loads(run_wtbox("new", "quiet", "--repo", str(repo), "--json").stdout)
    assert box["url"] is None and box["urls"] == {} and caddy_pid(wtbox_home) is None
    off = run_wtbox("url", "quiet", check=False)
    assert off.returncode == 1 and "The router is off ([host] router = false" in off.stderr
    for line, expected in (("router_port = 70000", "a port number from 1 to 65535"),
                           ('router_listen = "everywhere"', "an IP address"), ('router = "yes"', "true or false")):
        (wtbox_home / "config.toml").write_text(f"[host]\n{line}\n")
        r = run_wtbox("url", "quiet", check=False)
        assert r.returncode == 2 and expected in r.stderr and "Traceback" not in r.stderr, r.stderr
    (wtbox_home / "config.toml").write_text("[host]\nrouter = false\n")
    run_wtbox("rm", "quiet")


@needs_caddy
def test_caddy_missing_never_fails_a_box(run_wtbox, make_repo, wtbox_home):
    repo = make_repo(toml=router_toml())
    r = run_wtbox("new", "plain", "--repo", str(repo), "--json", env={"WTBOX_CADDY": "no-such-caddy"})
    assert json.loads(r.stdout)["state"] == "ready"
    assert "Caddy is not installed" in r.stderr and "apt-get install caddy" in r.stderr
    doctor = json.loads(run_wtbox("doctor", "--json", check=False, env={"WTBOX_CADDY": "no-such-caddy"}).stdout)
    assert not next(c for c in doctor["checks"] if c["check"] == "router")["ok"]
    run_wtbox("rm", "plain", env={"WTBOX_CADDY": "no-such-caddy"})


@needs_caddy
def test_beyond_the_loopback_every_request_needs_the_token(run_wtbox, make_repo, wtbox_home):
    wtbox_home.mkdir(parents=True)
    (wtbox_home / "config.toml").write_text('[host]\nrouter_listen = "0.0.0.0"\n')
    repo = make_repo(toml=router_toml())
    run_wtbox("new", "guarded", "--repo", str(repo))
    port = router_port(wtbox_home)
    token = (wtbox_home / "router" / "token").read_text().strip()
    assert (wtbox_home / "router" / "token").stat().st_mode & 0o777 == 0o600 and len(token) >= 32

    assert get(port, "guarded.localhost")[0] == 401
    assert get(port, "nobody.localhost")[0] == 401  # not even the list of names
    assert get(port, "guarded.localhost", headers={"Authorization": "Bearer wrong"})[0] == 401
    assert get(port, "guarded.localhost", headers={"Authorization": f"Bearer {token}"})[0] == 200
    basic = base64.b64encode(f"wtbox:{token}".encode()).decode()
    assert get(port, "guarded.localhost", headers={"Authorization": f"Basic {basic}"})[0] == 200

    quiet = run_wtbox("url", "guarded", "--json")
    assert token not in quiet.stdout + quiet.stderr and json.loads(quiet.stdout)["token_needed"] is True
    assert json.loads(run_wtbox("url", "guarded", "--json", "--show-secrets").stdout)["token"] == token
    logs = "".join(p.read_text() for p in (wtbox_home / "router").glob("caddy.*") if p.is_file())
    assert token not in logs
    run_wtbox("rm", "guarded")


@needs_caddy
def test_a_box_claimed_from_the_pool_is_routed_by_its_new_name(host, make_repo):
    from worktreebox.fleet import pool

    repo = make_repo(toml=router_toml("[pool]\nsize = 1\n", name=""))  # a box made ahead knows no id
    t = pool.resolve_target(repo)
    pool.top_up(host, t, 1)
    assert caddy_pid(host.home) is None, "a pooled box alone needs no router"
    box = pool.claim(host, "claimed", t)
    assert box is not None and box.data["pool_id"] != box.id
    port = router_port(host.home)
    assert get(port, "claimed.localhost")[1].count(box.data["pool_id"]) == 2  # its services keep that name
    for b in host.list():
        host.rm(b, force=True)
    assert wait_for(lambda: caddy_pid(host.home) is None, timeout=10)


def test_started_router_leaves_the_admin_default_port_alone():
    """Guard: no config wtbox makes ever names Caddy's default admin address."""
    text = routes.encode(routes.caddy_config([], listen="127.0.0.1", port=1, admin="/s", log_file="/l")).decode()
    assert "2019" not in text and '"listen":"unix//s"' in text and '"persist":false' in text


@needs_caddy
def test_mcp_box_url_list_and_status_carry_the_url(run_wtbox, make_repo, wtbox_home):
    import anyio
    from mcp_helpers import failed, ok, stdio_client

    repo = make_repo(toml=router_toml())
    box = json.loads(run_wtbox("new", "agent-view", "--repo", str(repo), "--json").stdout)
    port = router_port(wtbox_home)
    want = f"http://web.agent-view.localhost:{port}/"

    async def main():
        async with stdio_client(wtbox_home) as client:
            url = ok(await client.call_tool("box_url", {"box": "agent-view"}))
            assert url["url"] == want and url["urls"]["ws"] == f"http://ws.agent-view.localhost:{port}/"
            assert ok(await client.call_tool("box_url", {"box": box["id"], "service": "ws"}))["service"] == "ws"
            assert "no service port 'nope'" in failed(await client.call_tool("box_url", {"box": box["id"],
                                                                                          "service": "nope"}))
            assert [b["url"] for b in ok(await client.call_tool("box_list", {}))] == [want]
            assert ok(await client.call_tool("box_status", {"box": "agent-view"}))["url"] == want

    anyio.run(main)
    assert get(port, "agent-view.localhost")[0] == 200
    run_wtbox("rm", "agent-view")


@needs_caddy
def test_a_caddy_its_starter_never_recorded_is_swept_by_gc(run_wtbox, wtbox_home):
    """`new` killed between starting Caddy and writing router/state.json: gc finds it by the home's
    bootstrap file on its command line, and ends it."""
    from worktreebox.router.state import Paths

    paths = Paths(wtbox_home)
    paths.make()
    ident = caddy.start(paths, caddy.find(), routes.encode(routes.bootstrap(str(paths.socket), str(paths.log))))
    assert procs.is_alive(ident) and read_state(wtbox_home) == {}
    out = json.loads(run_wtbox("gc", "--json").stdout)
    assert out["router"] == {"running": False, "routes": 0}
    assert wait_for(lambda: not procs.pid_alive(ident[0]), timeout=5)


@needs_caddy
@pytest.mark.serial  # any gc running beside it sweeps the same gone home's router (CI saw another worker's do it)
def test_gc_of_any_home_stops_the_router_of_a_deleted_home(run_wtbox, tmp_path):
    """A home deleted while its router ran: nothing of that home is left to stop it, so gc of any
    home does (as it sweeps the cgroups of deleted homes)."""
    from worktreebox.router.state import Paths

    gone = tmp_path / "gone"
    paths = Paths(gone)
    paths.make()
    ident = caddy.start(paths, caddy.find(), routes.encode(routes.bootstrap(str(paths.socket), str(paths.log))))
    line = f"router pid {ident[0]} of {gone} (home is gone)"
    # (Another home's gc, of a test running beside this one, may stop it first: that is the point.)
    dry = json.loads(run_wtbox("gc", "--dry-run", "--json").stdout)
    assert line in dry["routers"] or not procs.pid_alive(ident[0])
    alive = procs.pid_alive(ident[0])  # (the dry run's look is a second old: another gc may have run since)
    out = json.loads(run_wtbox("gc", "--json").stdout)
    assert wait_for(lambda: not procs.pid_alive(ident[0]), timeout=5)
    assert line in out["routers"] or not alive or line not in dry["routers"]


@needs_caddy
def test_url_names_a_missing_caddy(run_wtbox, make_repo, wtbox_home):
    repo = make_repo(toml=router_toml())
    no_caddy = {"WTBOX_CADDY": "no-such-caddy"}
    run_wtbox("new", "first", "--repo", str(repo), env=no_caddy)
    r = run_wtbox("url", "first", check=False, env=no_caddy)
    assert r.returncode == 1 and "Caddy is not installed" in r.stderr and r.stderr.count("\n") == 1
    port = json.loads(run_wtbox("url", "first", "--json").stdout)["router"]["port"]  # with Caddy: it starts
    assert get(port, "first.localhost")[0] == 200
    run_wtbox("rm", "first")


def test_threads_asking_at_once_share_syncs_that_began_after_they_asked():
    """rm --all's threads each ask for a router sync: they share runs, and every caller still
    sees one that started after it asked (the registry as it left it)."""
    import threading
    import time

    from worktreebox.router.control import _Batch

    batch, runs, lock = _Batch(), [], threading.Lock()
    asked: dict[int, float] = {}
    served: dict[int, float] = {}

    def run():
        start = time.monotonic()
        time.sleep(0.05)
        with lock:
            runs.append(start)
        return {"started": start}

    def caller(i):
        asked[i] = time.monotonic()
        served[i] = batch.sync(run)["started"]

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
        time.sleep(0.005)
    for t in threads:
        t.join()
    assert len(runs) < 12
    assert all(served[i] >= asked[i] for i in asked)
    failing = _Batch()
    with pytest.raises(ZeroDivisionError):
        failing.sync(lambda: {"x": 1 / 0})
    assert failing.sync(lambda: {"x": 1}) == {"x": 1}


def test_ls_computes_the_routed_names_once_per_list(monkeypatch):
    """`ls` asks for each box's URL with the same list of boxes: the names of all of them are
    computed once, not once per box (ls was quadratic: 0.8 s with 300 boxes)."""
    import pathlib

    from worktreebox.box import READY, Box
    from worktreebox.router import routes

    boxes = [Box(id=f"s{i}-{i:08x}", task=f"s{i}", repo="/r", branch="b", dir=pathlib.Path(f"/x/{i}"), state=READY,
                 ports={"web": 20000 + i}, env={"PORT": str(20000 + i)}) for i in range(50)]
    calls = []
    real = routes.names
    monkeypatch.setattr(routes, "names", lambda bs: calls.append(1) or real(bs))
    urls = [routes.box_urls(b, boxes, 8080) for b in boxes]
    assert len(calls) == 1 and urls[7] == {"web": routes.url(8080, "s7", "web")}
    routes.box_urls(boxes[0], list(boxes), 8080)  # another list: computed for it
    assert len(calls) == 2


def test_caddys_version_is_asked_once_per_binary(tmp_path):
    """`caddy version` is a second Go start-up on the path of every `new` that starts the router: its
    answer is kept for the binary that gave it, and asked again of a new binary (an upgrade)."""
    calls = tmp_path / "calls"
    binary = tmp_path / "caddy"
    binary.write_text(f"#!/bin/sh\necho x >> {calls}\necho 'v2.6.2 h1:abc='\n")
    binary.chmod(0o755)
    known = tmp_path / "router" / "caddy-version.json"
    known.parent.mkdir()
    asked = lambda: len(calls.read_text().splitlines()) if calls.exists() else 0

    assert caddy.version(str(binary), known) == (2, 6, 2) and asked() == 1
    assert caddy.version(str(binary), known) == (2, 6, 2) and asked() == 1
    replaced = tmp_path / "caddy.new"
    replaced.write_text(f"#!/bin/sh\necho x >> {calls}\necho 'v2.7.6 h1:def='\n")
    replaced.chmod(0o755)
    replaced.rename(binary)  # as a package upgrade puts a new file in place
    assert caddy.version(str(binary), known) == (2, 7, 6) and asked() == 2
    known.write_text("{not json")
    assert caddy.version(str(binary), known) == (2, 7, 6) and asked() == 3
    assert caddy.version(str(binary)) == (2, 7, 6) and asked() == 4  # nothing to keep it in: asked each time


@needs_caddy
def test_a_start_after_a_starter_killed_mid_start_ends_the_caddy_it_left_and_only_then_looks(wtbox_home,
                                                                                              monkeypatch):
    """A starter killed between starting Caddy and recording it leaves its `starting` mark: the next
    start ends the Caddy no file names (found by the bootstrap file on its command line). Without the
    mark no start scans every process for one."""
    from worktreebox.router import control

    paths = Paths(wtbox_home)
    paths.make()
    binary = caddy.find()
    paths.starting.touch()  # what the killed starter did first,
    orphan = caddy.start(paths, binary, routes.encode(routes.bootstrap(str(paths.socket), str(paths.log))))  # then
    assert procs.is_alive(orphan) and read_state(wtbox_home) == {}
    state = control._start(paths, binary)
    try:
        assert wait_for(lambda: not procs.pid_alive(orphan[0]), timeout=5)
        assert procs.is_alive(state["pid"]) and not paths.starting.exists()
        caddy.stop(state["pid"])
        scans = []
        monkeypatch.setattr(control.procs, "kill_mentioning", lambda *a, **k: scans.append(a) or [])
        state = control._start(paths, binary)
        assert scans == [] and procs.is_alive(state["pid"])
    finally:
        caddy.stop(state["pid"])
