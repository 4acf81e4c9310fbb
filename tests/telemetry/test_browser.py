"""`wtbox browse` and `[browser] enabled`: a real Chromium (Debian's) against a real service in a box.

The service (tests/apps/browser_app.py) serves a page with a coloured 200x100 block at the top left, a
console.error and an image that answers 404, and a /slow page that never finishes loading.
Every Chromium start costs about a second here, so each test makes as few as it can.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import APPS, wait_for
from PIL import Image

APP = APPS / "browser_app.py"
HAVE_CHROMIUM = bool(shutil.which("chromium"))
HAVE_VM = bool(shutil.which("victoria-metrics"))
needs_chromium = pytest.mark.skipif(not HAVE_CHROMIUM, reason="the Debian package chromium is not installed")

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _toml(colour: str, *, browser: bool = False, observability: bool = False) -> str:
    return (f'[box]\nports = ["web"]\n[database]\nmode = "none"\n'
            f'[observability]\nenabled = {"true" if observability else "false"}\n'
            f'[services.web]\ncmd = "{sys.executable} {APP} {{{{ ports.web }}}} {colour}"\n'
            'ready = "http://127.0.0.1:{{ ports.web }}/"\n'
            + ("[browser]\nenabled = true\n" if browser else ""))


def _new(run_wtbox, make_repo, colour: str, task: str | None = None, **kw) -> dict:
    repo = make_repo(toml=_toml(colour, **kw))
    return json.loads(run_wtbox("new", task or f"ui-{colour}", "--repo", str(repo), "--json").stdout)


def _chromium_of(box_dir: str) -> list[int]:
    """Live processes whose command line names the box's browser dir (Chromium's profile is under it)."""
    marker = os.path.join(box_dir, "browser") + os.sep
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and any(marker in a for a in p.info["cmdline"] or ()):
                found.append(p.pid)
        except psutil.Error:
            continue
    return found


def _one_sentence(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@needs_chromium
def test_browse_screenshot_console_and_failed_requests_reach_json_logs_and_metrics(
        run_wtbox, make_repo, tmp_path, host):
    box = _new(run_wtbox, make_repo, "ff0000", observability=HAVE_VM)
    shot = tmp_path / "shot.png"
    r = json.loads(run_wtbox("browse", box["id"], "/", "--screenshot", str(shot), "--viewport", "640x400",
                             "--json").stdout)

    # The PNG is the viewport, and its pixels are the page: the block red, the rest white.
    img = Image.open(shot)
    assert img.format == "PNG" and img.size == (640, 400)
    rgb = img.convert("RGB")
    assert rgb.getpixel((5, 5)) == RED and rgb.getpixel((195, 95)) == RED
    assert rgb.getpixel((205, 50)) == WHITE and rgb.getpixel((100, 105)) == WHITE and rgb.getpixel((600, 350)) == WHITE

    assert r["status"] == 200 and r["title"] == "block ff0000" and r["warm"] is False
    assert r["url"] == f"http://127.0.0.1:{box['ports']['web']}/" and r["load_seconds"] > 0
    seen = [{k: c[k] for k in ("level", "text")} for c in r["console"]]
    assert {"level": "error", "text": "boom from the page"} in seen
    assert any(c["level"] == "warning" and c["text"] == "careful" for c in r["console"])
    assert [f for f in r["failed_requests"] if f["url"].endswith("/missing.png")] == \
        [{"url": f"http://127.0.0.1:{box['ports']['web']}/missing.png", "status": 404}]

    # The same errors are in the box's logs, as service `browser` at level error.
    logs = [json.loads(ln) for ln in run_wtbox("logs", box["id"], "--service", "browser", "--level", "error",
                                               "--json").stdout.splitlines()]
    assert {rec["service"] for rec in logs} == {"browser"} and {rec["level"] for rec in logs} == {"error"}
    msgs = [rec["msg"] for rec in logs]
    assert "boom from the page" in msgs and any("404" in m and "/missing.png" in m for m in msgs)
    assert "careful" not in msgs  # a warning is not an error

    if HAVE_VM:  # ... and in its metrics
        def pushed():
            out = json.loads(run_wtbox("metrics", box["id"], "wtbox_browser_console_errors_total", "--json").stdout)
            return out["result"]
        series = wait_for(pushed, timeout=10)
        assert series and series[0]["metric"]["path"] == "/" and int(series[0]["value"][1]) >= 1
        load = json.loads(run_wtbox("metrics", box["id"], "wtbox_browser_page_load_seconds", "--json").stdout)
        assert float(load["result"][0]["value"][1]) == pytest.approx(r["load_seconds"])

    # Cold: the Chromium started for the command is gone, and so is its port lease.
    assert _chromium_of(box["dir"]) == []
    assert "browser" not in host.registry.ports_of(box["id"])

    # A page that never loads: one sentence, exit 1, and what the console said so far is in the logs.
    # 5 s, not less: on a loaded host (the suite's parallel pass) a page's first script can take seconds
    slow = run_wtbox("browse", box["id"], "/slow", "--timeout", "5s", check=False)
    assert slow.returncode == 1
    assert "did not load within 5 s" in slow.stderr.strip().splitlines()[-1] and "Traceback" not in slow.stderr
    logs = run_wtbox("logs", box["id"], "--service", "browser", "--level", "error").stdout
    assert "half way" in logs and "did not load within 5 s" in logs
    assert _chromium_of(box["dir"]) == []


@needs_chromium
def test_browser_enabled_exports_cdp_url_compares_boxes_and_leaves_nothing_after_rm(run_wtbox, make_repo, tmp_path,
                                                                                  host, wtbox_home):
    import portpicker
    from playwright.sync_api import sync_playwright

    red = _new(run_wtbox, make_repo, "ff0000", browser=True)
    blue = _new(run_wtbox, make_repo, "0000ff", browser=True)
    red2 = _new(run_wtbox, make_repo, "ff0000", task="ui-ff0000-again", browser=True)  # a task name is one box's
    boxes = [red, blue, red2]

    # WTBOX_CDP_URL is the box's own DevTools endpoint (at the port the box sees: 9222 in a sandboxed
    # one), reached from the host at the leased port, and a CDP client opens pages through it.
    cdp = f"http://127.0.0.1:{red['ports']['browser']}"
    assert red["env"]["WTBOX_CDP_URL"] == f"http://127.0.0.1:{red.get('inside_ports', red['ports'])['browser']}"
    assert len({b["ports"]["browser"] for b in boxes}) == 3
    env_out = run_wtbox("exec", red["id"], "--", "sh", "-c", "echo $WTBOX_CDP_URL").stdout.strip()
    assert env_out == red["env"]["WTBOX_CDP_URL"]
    with sync_playwright() as pw:
        browser = pw.chromium.connect_over_cdp(cdp)
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{red['ports']['web']}/")
        assert page.title() == "block ff0000"
        browser.close()  # detaches; the box's Chromium keeps running

    # Different colours: a non-zero ratio (the 200x100 block of 640x400 is 7.8 %), and a diff image
    # that marks the block.
    diff = tmp_path / "diff.png"
    r = json.loads(run_wtbox("browse", red["id"], "/", "--compare", blue["id"], "--diff", str(diff),
                             "--viewport", "640x400", "--screenshot", str(tmp_path / "a.png"), "--json").stdout)
    assert r["warm"] is True and r["compare"]["warm"] is True and r["compare"]["box"] == blue["id"]
    assert r["diff_ratio"] == pytest.approx(200 * 100 / (640 * 400), abs=0.005)
    d = Image.open(diff).convert("RGB")
    assert d.size == (640, 400) and d.getpixel((100, 50)) == RED and d.getpixel((400, 300)) != RED
    assert Image.open(r["compare"]["screenshot"]).convert("RGB").getpixel((100, 50)) == BLUE
    # Identical pages: ~0.
    same = json.loads(run_wtbox("browse", red["id"], "/", "--compare", red2["id"], "--viewport", "640x400",
                                "--json").stdout)
    assert same["diff_ratio"] < 0.001

    # The MCP tool is the same operation: warm, the same fields, errors as one sentence.
    import anyio
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters

    async def over_mcp():
        env = {"WTBOX_HOME": str(wtbox_home), "WTBOX_NO_AUTO_GC": "1", "PATH": os.environ["PATH"]}
        async with Client(StdioServerParameters(command=sys.executable, args=["-m", "worktreebox.cli.main", "mcp"],
                                                env=env)) as client:
            res = await client.call_tool("box_browse", {"box": blue["id"], "target": "/", "viewport": "640x400"})
            assert not res.is_error, res.content[0].text
            assert res.structured_content["warm"] is True and res.structured_content["title"] == "block 0000ff"
            bad = await client.call_tool("box_browse", {"box": blue["id"], "viewport": "wide"})
            assert bad.is_error and "--viewport" in bad.content[0].text and "Traceback" not in bad.content[0].text
    anyio.run(over_mcp)

    # A box's Chromium that died is started again by the next browse, on the same DevTools port.
    from worktreebox.telemetry import browser as chromium

    main = int((Path(red["dir"]) / "run" / chromium.PID_FILE).read_text())
    os.kill(main, signal.SIGKILL)
    sandboxed = (red.get("sandbox") or {}).get("provider") not in (None, "off")  # known by its answer, then

    def running() -> bool:
        return chromium.running(red["id"], Path(red["dir"]), red["ports"]["browser"], sandboxed=sandboxed)

    assert wait_for(lambda: not running(), timeout=10)
    again = json.loads(run_wtbox("browse", red["id"], "/", "--json").stdout)
    assert again["warm"] is True and again["status"] == 200
    assert running()

    pids = {b["id"]: _chromium_of(b["dir"]) for b in boxes}
    assert all(pids.values()), pids  # each box runs its own
    for b in boxes:
        run_wtbox("rm", b["id"])
    for b in boxes:
        assert _chromium_of(b["dir"]) == []
        assert portpicker.is_port_free(b["ports"]["browser"])
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for ps in pids.values() for p in ps)


def test_bad_input_is_one_sentence(run_wtbox, make_repo, tmp_path, host):
    core = '[database]\nmode = "none"\n[observability]\nenabled = false\n'
    portless = json.loads(run_wtbox("new", "noports", "--repo", str(make_repo(toml='[box]\nports = []\n' + core)),
                                    "--json").stdout)
    r = run_wtbox("browse", portless["id"], "/", check=False)
    assert r.returncode == 2 and "has no ports" in _one_sentence(r.stderr)

    box = json.loads(run_wtbox("new", "web", "--repo", str(make_repo(toml=core)), "--json").stdout)
    r = run_wtbox("browse", box["id"], "/", env={"WTBOX_CHROMIUM": str(tmp_path / "no-such-chromium")}, check=False)
    assert r.returncode == 1 and "`chromium`" in _one_sentence(r.stderr)

    for bad in (tmp_path / "missing-dir" / "x.png", tmp_path):
        r = run_wtbox("browse", box["id"], "/", "--screenshot", str(bad), check=False)
        assert r.returncode == 2 and str(bad) in _one_sentence(r.stderr)
    r = run_wtbox("browse", box["id"], "/", "--viewport", "wide", check=False)
    assert r.returncode == 2 and "--viewport" in _one_sentence(r.stderr)

    r = run_wtbox("new", "cfg", "--repo", str(make_repo(toml=core + '[browser]\nenabled = "yes"\n')), check=False)
    assert r.returncode == 2 and "[browser] enabled" in _one_sentence(r.stderr) and "wtbox.toml" in r.stderr


@needs_chromium
def test_gc_after_kill9_of_new_stops_the_stray_chromium(wtbox_home, host, make_repo, run_wtbox):
    from worktreebox.telemetry import browser

    repo = make_repo(toml=_toml("ff0000", browser=True))
    env = {**os.environ, "WTBOX_HOME": str(wtbox_home), "WTBOX_NO_AUTO_GC": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "worktreebox.cli.main", "new", "killed", "--repo", str(repo)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    boxes = wtbox_home / "boxes"
    try:
        # Killed once its Chromium exists (seen twice, 0.2 s apart: a process caught in its first
        # instant may still be one Chromium replaces): the box is half made.
        def chromium_seen_twice():
            if browser.live_box_ids(boxes):
                time.sleep(0.2)
                return browser.live_box_ids(boxes)
            return set()

        assert wait_for(chromium_seen_twice, timeout=60, every=0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (box_id,) = browser.live_box_ids(boxes)
    assert box_id.startswith("killed-") and box_id in host.resource("browser").discover(host)
    gc = json.loads(run_wtbox("gc", "--grace", "0", "--json").stdout)
    assert any(a["id"] == box_id and a.get("done") for a in gc["actions"]), gc
    assert browser.live_box_ids(boxes) == set() and _chromium_of(str(boxes / box_id)) == []


@needs_chromium
def test_fanout_browse_adds_a_screenshot_and_console_errors_per_attempt(run_wtbox, make_repo, host):
    repo = make_repo(toml=_toml("00ff00"))
    rows = json.loads(run_wtbox("fanout", "look", "-n", "2", "--browse", "/", "--repo", str(repo), "--json",
                                timeout=240).stdout)
    assert len(rows) == 2
    for row in rows:
        assert row["console_errors"] == 2  # console.error + Chromium's own line for the 404 image
        img = Image.open(row["screenshot"]).convert("RGB")
        assert img.size == (1280, 800) and img.getpixel((100, 50)) == (0, 255, 0)
        assert Path(row["screenshot"]).is_relative_to(row["dir"])
    again = json.loads(run_wtbox("compare", "--fanout", "look", "--json").stdout)
    assert [r["console_errors"] for r in again] == [2, 2]
    assert "CONSOLE" in run_wtbox("compare", "--fanout", "look").stdout.splitlines()[0]


def test_diff_ratio_counts_changed_pixels():
    from worktreebox.telemetry.browser import diff_images

    def png(colour, size=(100, 50), block=None):
        img = Image.new("RGB", size, colour)
        if block:
            img.paste(block[1], block[0])
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    ratio, out = diff_images(png(WHITE), png(WHITE))
    assert ratio == 0
    ratio, out = diff_images(png(WHITE), png(WHITE, block=((0, 0, 10, 10), (254, 255, 255))))
    assert ratio == pytest.approx(100 / 5000)  # a difference of one step in one channel counts
    marked = Image.open(io.BytesIO(out)).convert("RGB")
    assert marked.getpixel((5, 5)) == RED and marked.getpixel((50, 25)) != RED
    ratio, _ = diff_images(png(WHITE, size=(100, 50)), png(WHITE, size=(100, 100)))
    assert ratio == pytest.approx(0.5)  # pixels that only one image has count as changed
