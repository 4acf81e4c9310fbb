"""The host router seen from a real browser: Debian's Chromium, driven by Playwright's Python
package (pointed at the system binary), loads http://<service>.<box>.localhost:<router port>/
as a person's browser does through the SSH tunnel (Chromium resolves *.localhost itself).

One Chromium for the whole story, since each start costs about a second here: two boxes by
name, a WebSocket echo and server-sent events through the router, a box made after the router
started, the list page after `rm`, and a `kill -9` of Caddy healed by the next wtbox command.
"""
from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
from helpers import wait_for
from router_helpers import caddy_pid, router_toml

from worktreebox.system import procs

needs_browser = pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("caddy")),
                                   reason="the Debian packages chromium and caddy are needed")

ECHO = """async (url) => {
    const ws = new WebSocket(url);
    await new Promise((ok, fail) => { ws.onopen = ok; ws.onerror = () => fail(new Error("no connection")); });
    const reply = new Promise((ok) => { ws.onmessage = (e) => ok(e.data); });
    ws.send("ping " + url);
    const got = await reply;
    ws.close();
    return got;
}"""
EVENT = """async (url) => {
    const source = new EventSource(url);
    const got = await new Promise((ok, fail) => {
        source.onmessage = (e) => ok(e.data);
        setTimeout(() => fail(new Error("no event within 5 s")), 5000);
    });
    source.close();
    return got;
}"""


@pytest.fixture
def chromium():
    """A headless Chromium (the Debian binary) under Playwright, closed after the test."""
    from playwright.sync_api import sync_playwright

    from worktreebox.telemetry import browser

    flags = [f for f in browser.FLAGS
             if f not in ("--headless", "--no-startup-window") and not f.startswith("--remote-debugging")]
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=browser.find_chromium(), args=flags, headless=True)
        try:
            yield b
        finally:
            b.close()


def _new(run_wtbox, repo, task: str) -> dict:
    box = json.loads(run_wtbox("new", task, "--repo", str(repo), "--json").stdout)
    return {**box, "url": json.loads(run_wtbox("url", task, "--json").stdout)["url"]}


def _title(page, url: str) -> tuple[int, str]:
    resp = page.goto(url)
    return resp.status, page.title()


@needs_browser
def test_boxes_by_name_websocket_events_new_box_rm_and_kill_9_in_chromium(run_wtbox, make_repo, wtbox_home,
                                                                          chromium):
    repo = make_repo(toml=router_toml())
    a, b = _new(run_wtbox, repo, "alpha"), _new(run_wtbox, repo, "beta")
    port = json.loads(run_wtbox("url", "alpha", "--json").stdout)["router"]["port"]
    assert a["url"] == f"http://web.alpha.localhost:{port}/"
    page = chromium.new_page()

    # Each box's own page, by task name and by id, through one port.
    for box in (a, b):
        assert _title(page, box["url"]) == (200, f"box {box['id']}")
        assert _title(page, f"http://{box['id']}.localhost:{port}/") == (200, f"box {box['id']}")

    # A WebSocket echo (the box's `ws` service) and server-sent events (`web`'s /events) pass.
    page.goto(a["url"])
    ws_url = f"ws://ws.alpha.localhost:{port}/"
    assert page.evaluate(ECHO, ws_url) == f"ping {ws_url}"
    assert page.evaluate(EVENT, f"http://web.alpha.localhost:{port}/events") == f"hello {a['id']}"

    # A box made after the router started is reachable at once, with no restart.
    pid = caddy_pid(wtbox_home)
    c = _new(run_wtbox, repo, "gamma")
    assert caddy_pid(wtbox_home) == pid
    assert _title(page, c["url"]) == (200, f"box {c['id']}")

    # After `rm` its name answers with the list of the live boxes.
    run_wtbox("rm", "gamma")
    status, title = _title(page, c["url"])
    listed = [a_.inner_text() for a_ in page.query_selector_all("li a")]
    assert (status, title) == (404, "wtbox: no such box") and sorted(listed) == ["alpha", "beta"]

    # kill -9 of the router: nothing answers until the next wtbox command brings it back with every route.
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not procs.pid_alive(pid), timeout=5)
    with pytest.raises(Exception, match="ERR_CONNECTION_REFUSED"):
        page.goto(a["url"])
    run_wtbox("status", "beta")
    assert caddy_pid(wtbox_home) not in (None, pid)
    for box in (a, b):
        assert _title(page, box["url"]) == (200, f"box {box['id']}")
    page.goto(a["url"])
    assert page.evaluate(ECHO, ws_url) == f"ping {ws_url}"
    run_wtbox("rm", "alpha", "beta")
    assert caddy_pid(wtbox_home) is None
