"""`wtbox mcp`, driven as a real subprocess with the official SDK's own clients (stdio and HTTP)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from helpers import APPS, SLOW_SETUP_TOML, box_runs
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp_helpers import failed, ok, stdio_client

APP = (APPS / "metrics_app.py").read_text()
SECRET = "hunter2-sekret-value"

# A small service, the box's own VictoriaMetrics, and a secret-looking variable in the box env.
WEB_TOML = f"""
[box]
env = {{ APP_SECRET = "{SECRET}" }}
[database]
mode = "none"
[services.web]
cmd = "python3 app.py {{{{ ports.web }}}}"
ready = "http://127.0.0.1:{{{{ ports.web }}}}/fast"
"""
CORE_TOML = f"""
[box]
env = {{ APP_SECRET = "{SECRET}" }}
[database]
mode = "none"
[observability]
enabled = false
"""


def run(fn) -> None:
    anyio.run(fn)


# Tests that make boxes take the `host` fixture too: it removes whatever a failed test left.


@pytest.mark.slow
def test_tools_have_schemas_and_errors_are_one_sentence(wtbox_home):
    async def main():
        async with stdio_client(wtbox_home) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert {"box_new", "box_list", "box_status", "box_exec", "box_logs", "box_metrics", "box_probe",
                    "box_up", "box_down", "box_restart", "box_rm", "fanout", "compare", "box_browse"} <= set(tools)
            for name, tool in tools.items():
                assert tool.description, name
                assert tool.output_schema is not None, name  # structured results
                props = tool.input_schema["properties"]
                if name.startswith("box_") and name not in ("box_new", "box_list"):
                    assert "box" in props and "box" in tool.input_schema["required"], name
            exec_props = tools["box_exec"].input_schema["properties"]
            assert {"cmd", "cwd", "timeout", "tail"} <= set(exec_props)
            assert {s.get("type") for s in exec_props["cmd"]["anyOf"]} == {"array", "string"}
            assert {"query", "range", "step"} <= set(tools["box_metrics"].input_schema["properties"])
            assert {"target", "screenshot", "viewport", "wait_for", "timeout", "compare", "diff"} <= \
                set(tools["box_browse"].input_schema["properties"])
            assert {"task", "repo", "ref", "ttl", "no_services"} <= set(tools["box_new"].input_schema["properties"])
            templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
            assert templates == {"wtbox://box/{box}/status", "wtbox://box/{box}/env",
                                 "wtbox://box/{box}/logs/{service}"}

            # Errors are tool errors with one sentence, and the server answers the next call.
            assert "No box matches 'nope'" in failed(await client.call_tool("box_status", {"box": "nope"}))
            assert "'cmd' is required" in failed(await client.call_tool("box_exec", {"box": "nope"}))
            assert "'tail'" in failed(await client.call_tool("box_logs", {"box": "x", "tail": -1}))
            assert "Unknown tool" in failed(await client.call_tool("box_nothing", {}))
            msg = failed(await client.call_tool("box_new", {"task": "!!!"}))
            assert "no letters or digits" in msg
            assert ok(await client.call_tool("box_list", {})) == []
            with pytest.raises(MCPError, match="No box matches 'nope'"):
                await client.read_resource("wtbox://box/nope/status")
            assert (await client.list_resources()).resources == []

    run(main)


@pytest.mark.skipif(shutil.which("victoria-metrics") is None, reason="victoria-metrics is not installed")
def test_new_exec_logs_metrics_resources_rm(wtbox_home, make_repo, host):
    repo = make_repo({"app.py": APP, "sub/keep.txt": "x\n"}, toml=WEB_TOML)
    notes: list[str] = []

    async def progress(value, total, message):
        notes.append(message or "")

    async def main():
        async with stdio_client(wtbox_home) as client:
            box = ok(await client.call_tool("box_new", {"task": "mcp-life", "repo": str(repo)},
                                            progress_callback=progress))
            assert box["task"] == "mcp-life" and box["state"] == "ready" and box["env"]["APP_SECRET"] == "***"
            assert [s["state"] for s in box["services"]] == ["ready"]
            assert any("services" in n for n in notes), notes
            bid = box["id"]
            # what it was made from: the same fingerprint in new, status and list; diff of a box with itself
            assert box["fingerprint"]["hash"] and box["pool"]["claimed"] is False
            status = ok(await client.call_tool("box_status", {"box": bid}))
            assert status["fingerprint"] == box["fingerprint"] and status["fingerprint"]["parts"]["commit"]
            listed = ok(await client.call_tool("box_list", {}))
            assert [b["fingerprint"] for b in listed] == [box["fingerprint"]["hash"]]
            same = ok(await client.call_tool("diff", {"a": bid, "b": "mcp-life"}))
            assert same["same"] and same["fingerprint"] == same["files"] == same["data"] == []

            # exec: argv list, exit code, both streams
            r = ok(await client.call_tool("box_exec", {"box": "mcp-life", "cmd": [
                "python3", "-c", "import sys; print('out-1'); print('err-1', file=sys.stderr); sys.exit(3)"]}))
            assert (r["exit_code"], r["stdout"], r["stderr"]) == (3, "out-1", "err-1")
            # a shell string, a cwd inside the worktree, the box env with the secret masked, tails
            r = ok(await client.call_tool("box_exec", {"box": bid, "cwd": "sub", "tail": 3,
                                                       "cmd": "echo $APP_SECRET; seq 1 10; pwd; echo $WTBOX_ID"}))
            assert r["exit_code"] == 0 and r["cwd"] == "sub" and r["id"] == bid
            assert r["stdout"].splitlines() == ["10", str(Path(box["path"]) / "sub"), bid]
            assert r["stdout_lines"] == 13
            r = ok(await client.call_tool("box_exec", {"box": bid, "cmd": "echo $APP_SECRET", "tail": 1}))
            assert r["stdout"] == "***" and SECRET not in json.dumps(r)
            assert "outside the worktree" in failed(await client.call_tool(
                "box_exec", {"box": bid, "cmd": "ls", "cwd": "../.."}))
            assert "--allow-secrets" in failed(await client.call_tool(
                "box_exec", {"box": bid, "cmd": "true", "show_secrets": True}))
            r = ok(await client.call_tool("box_exec", {"box": bid, "cmd": ["sleep", "30"], "timeout": 0.5}))
            assert r["exit_code"] == 124 and r["timed_out"]
            r = ok(await client.call_tool("box_exec", {"box": bid, "cmd": ["no-such-program-x"]}))
            assert r["exit_code"] == 127

            # probe records into the box's metrics; metrics reads them back (instant and range)
            p = ok(await client.call_tool("box_probe", {"box": bid, "target": "/", "n": 20}))
            assert p["answered"] == 20 and p["recorded"] and p["id"] == bid
            m = ok(await client.call_tool("box_metrics", {
                "box": bid, "query": 'wtbox_probe_duration_seconds_count{path="/"}'}))
            assert m["resultType"] == "vector" and m["result"][0]["value"][1] == "20"
            for _ in range(40):  # a range query sees a sample once it is older than the store's latency offset
                m = ok(await client.call_tool("box_metrics", {
                    "box": bid, "query": "wtbox_probe_duration_seconds_count", "range": "5m", "step": "1s"}))
                if m["result"]:
                    break
                await anyio.sleep(0.25)
            assert m["resultType"] == "matrix" and m["result"][0]["values"]
            assert "rejected" in failed(await client.call_tool("box_metrics", {"box": bid, "query": "sum("}))

            # logs: the service's request lines, filtered
            recs = ok(await client.call_tool("box_logs", {"box": bid, "service": "web", "grep": "GET /"}))
            assert recs and all(r["service"] == "web" and "GET /" in r["msg"] for r in recs)
            assert len(ok(await client.call_tool("box_logs", {"box": bid, "service": ["web"], "tail": 2}))) == 2
            assert "no service 'nope'" in failed(await client.call_tool("box_logs", {"box": bid, "service": "nope"}))

            # resources: the live box's status, env and logs, without a tool call
            uris = {str(r.uri) for r in (await client.list_resources()).resources}
            base = f"wtbox://box/{bid}"
            assert {f"{base}/status", f"{base}/env", f"{base}/logs/web"} <= uris
            status = json.loads((await client.read_resource(f"{base}/status")).contents[0].text)
            assert status["id"] == bid and status["services"][0]["name"] == "web"
            env = json.loads((await client.read_resource(f"{base}/env")).contents[0].text)
            assert env["APP_SECRET"] == "***" and env["WTBOX_ID"] == bid
            lines = (await client.read_resource(f"{base}/logs/web")).contents[0].text.splitlines()
            assert lines and json.loads(lines[-1])["service"] == "web"

            # services down and up again
            down = ok(await client.call_tool("box_down", {"box": bid}))
            assert down["id"] == down["box"] == bid and [s["state"] for s in down["services"]] == ["stopped"]
            up = ok(await client.call_tool("box_up", {"box": bid, "reload": True}))
            assert [s["state"] for s in up["services"]] == ["ready"]
            reloaded = ok(await client.call_tool("box_status", {"box": bid}))["config"]
            assert reloaded["source"].endswith("(reloaded)") and reloaded["sha256"] == status["config"]["sha256"]

            # rm: refuses unsaved work unless force
            await client.call_tool("box_exec", {"box": bid, "cmd": "echo new > untracked.txt"})
            assert "rm --force" in failed(await client.call_tool("box_rm", {"box": bid}))
            gone = ok(await client.call_tool("box_rm", {"box": bid, "force": True}))
            assert gone["id"] == bid
            assert ok(await client.call_tool("box_list", {})) == []
            assert "No box matches" in failed(await client.call_tool("box_status", {"box": bid}))

    run(main)
    assert not list((wtbox_home / "boxes").iterdir())


def test_cancelled_box_new_leaves_no_box(wtbox_home, make_repo, host):
    repo = make_repo(toml=SLOW_SETUP_TOML)

    async def main():
        async with stdio_client(wtbox_home) as client:
            with anyio.CancelScope() as scope:
                async def progress(value, total, message):
                    if "setup" in (message or ""):
                        scope.cancel()  # the client sends notifications/cancelled
                with anyio.fail_after(60):
                    await client.call_tool("box_new", {"task": "cancel-me", "repo": str(repo)},
                                           progress_callback=progress)
            assert scope.cancelled_caught
            # The rollback happens in the server; the same session still answers meanwhile. (Poll
            # without blocking the loop: the client sends its notifications/cancelled from it.)
            with anyio.move_on_after(40):  # well before the setup command would end by itself
                while _leftovers(wtbox_home, repo):
                    assert isinstance(ok(await client.call_tool("box_list", {})), list)
                    await anyio.sleep(0.25)
            assert not _leftovers(wtbox_home, repo)
            assert ok(await client.call_tool("box_list", {})) == []

    run(main)


def _leftovers(home: Path, repo: Path) -> list[str]:
    """Anything of a box still on the host: rows, leases, dirs, branches, processes."""
    import sqlite3

    out = []
    db = sqlite3.connect(home / "registry.sqlite3")
    out += [f"row {r[0]}" for r in db.execute("SELECT id FROM boxes")]
    out += [f"lease {r[0]}" for r in db.execute("SELECT owner FROM port_leases WHERE owner NOT LIKE '@%'")]
    db.close()
    boxes = home / "boxes"
    out += [f"dir {p.name}" for p in boxes.iterdir()] if boxes.exists() else []
    branches = subprocess.run(["git", "-C", str(repo), "branch", "--list", "--format=%(refname:short)", "wtbox/*"],
                              capture_output=True, text=True).stdout.split()
    out += [f"branch {b}" for b in branches]
    out += [f"processes of {b}" for b in _box_processes(home)]
    return out


def _box_processes(home: Path) -> set[str]:
    from worktreebox.system import procs

    return procs.discover_box_ids(home / "boxes")


def test_vanished_box_dir_and_allowed_secrets(wtbox_home, make_repo, host):
    repo = make_repo(toml=CORE_TOML)
    broken = make_repo(toml=CORE_TOML + '[setup]\ncmd = "echo broken-setup-output; exit 3"\n')

    async def main():
        async with stdio_client(wtbox_home, "--allow-secrets") as client:
            # a failed creation: wtbox's whole message (with the setup's last lines), nothing left
            msg = failed(await client.call_tool("box_new", {"task": "broken", "repo": str(broken)}))
            assert "exit code 3" in msg and "broken-setup-output" in msg, msg
            assert ok(await client.call_tool("box_list", {})) == []

            box = ok(await client.call_tool("box_new", {"task": "vanish", "repo": str(repo), "show_secrets": True}))
            assert box["env"]["APP_SECRET"] == SECRET
            env = ok(await client.call_tool("box_env", {"box": "vanish"}))
            assert env["APP_SECRET"] == "***"
            env = ok(await client.call_tool("box_env", {"box": "vanish", "show_secrets": True}))
            assert env["APP_SECRET"] == SECRET
            r = ok(await client.call_tool("box_exec", {"box": "vanish", "cmd": "echo $APP_SECRET",
                                                       "show_secrets": True}))
            assert r["stdout"] == SECRET

            from worktreebox.providers.mounts.base import unmount_all

            unmount_all(box["dir"])  # a copy-on-write worktree is a mount: the dir vanishes once it is down
            shutil.rmtree(box["dir"])
            status = ok(await client.call_tool("box_status", {"box": "vanish"}))
            assert "is gone" in status["problem"]
            assert "is gone" in failed(await client.call_tool("box_exec", {"box": "vanish", "cmd": "true"}))
            assert ok(await client.call_tool("box_logs", {"box": "vanish"})) == []
            ok(await client.call_tool("box_rm", {"box": "vanish", "force": True}))
            assert ok(await client.call_tool("box_list", {})) == []

    run(main)


def test_fanout_reports_progress_compares_picks_and_cancels_like_ctrl_c(wtbox_home, make_repo, host):
    repo = make_repo(toml=CORE_TOML)
    seen: list[tuple[float, float | None, str]] = []

    async def progress(value, total, message):
        seen.append((value, total, message or ""))

    async def main():
        async with stdio_client(wtbox_home) as client:
            rows = ok(await client.call_tool("fanout", {"task": "fo", "n": 2, "repo": str(repo),
                                                        "run": "echo attempt {i} > out.txt"},
                                             progress_callback=progress))
            assert [(r["index"], r["state"], r["run_exit"]) for r in rows] == [(1, "done", 0), (2, "done", 0)]
            assert seen and all(total == 2 for _, total, _ in seen) and seen[-1][0] == 2
            values = [v for v, *_ in seen]
            assert values == sorted(values) and len(set(values)) == len(values)  # MCP: always growing
            assert any("running" in m for *_, m in seen)
            again = ok(await client.call_tool("compare", {"fanout": "fo", "sort": "index"}))
            assert [r["id"] for r in again] == [r["id"] for r in rows] and again[0]["diff_files"] == 1
            picked = ok(await client.call_tool("box_pick", {"box": rows[0]["id"]}))
            assert picked["kept"] == rows[0]["id"] and picked["removed"] == [rows[1]["id"]]
            ok(await client.call_tool("box_rm", {"box": rows[0]["id"], "force": True}))

            # Cancelled while the runs run: they are stopped and the boxes recorded, as Ctrl-C does.
            with anyio.CancelScope() as scope:
                async def on_progress(value, total, message):
                    if (message or "").endswith("running"):
                        scope.cancel()
                with anyio.fail_after(60):
                    await client.call_tool("fanout", {"task": "stop", "n": 1, "repo": str(repo),
                                                      "run": "sleep 60"}, progress_callback=on_progress)
            assert scope.cancelled_caught
            with anyio.move_on_after(60):
                while True:
                    boxes = ok(await client.call_tool("compare", {"fanout": "stop"}))
                    if boxes[0]["state"] == "interrupted":
                        break
                    await anyio.sleep(0.25)
            assert boxes[0]["state"] == "interrupted"
            assert box_runs(boxes[0]["id"], wtbox_home / "boxes" / boxes[0]["id"]) == []
            ok(await client.call_tool("box_rm", {"box": boxes[0]["id"], "force": True}))

    run(main)


# ---------------------------------------------------------------------- HTTP

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_document(stream) -> dict:
    """The one JSON document a running server printed (it keeps stdout open)."""
    text = ""
    while True:
        line = stream.readline()
        assert line, f"stdout ended before a whole JSON document: {text!r}"
        text += line
        try:
            return json.loads(text)
        except ValueError:
            continue


@asynccontextmanager
async def http_client(url: str, token: str):
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    async with (httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as http,
                Client(streamable_http_client(url, http_client=http)) as client):
        yield client


def test_http_needs_loopback_token_and_own_host(wtbox_home, run_wtbox):
    refused = run_wtbox("mcp", "--http", "0.0.0.0:8000", check=False)
    assert refused.returncode == 2 and "loopback only" in refused.stderr and "Traceback" not in refused.stderr

    port = _free_port()
    env = {**os.environ, "WTBOX_HOME": str(wtbox_home), "WTBOX_NO_AUTO_GC": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "worktreebox.cli.main", "mcp", "--http", f"127.0.0.1:{port}",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        about = _read_document(proc.stdout)
        assert about["url"] == f"http://127.0.0.1:{port}/mcp" and about["token_created"]
        token_file = wtbox_home / "mcp-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32 and token not in json.dumps(about)
        assert token in proc.stderr.readline()  # printed once, when made

        import httpx2

        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
        headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        url = about["url"]
        assert httpx2.post(url, json=body, headers=headers).status_code == 401
        bad = httpx2.post(url, json=body, headers={**headers, "Authorization": "Bearer wrong"})
        assert bad.status_code == 401
        good = {**headers, "Authorization": f"Bearer {token}"}
        assert httpx2.post(url, json=body, headers={**good, "Host": "evil.example:80"}).status_code == 421
        assert httpx2.post(url, json=body, headers={**good, "Origin": "http://evil.example"}).status_code == 403

        async def main():
            # two clients at once, each its own session
            async with http_client(url, token) as a, http_client(url, token) as b:
                ta, tb = await a.list_tools(), await b.list_tools()
                assert "box_exec" in {t.name for t in ta.tools} and len(ta.tools) == len(tb.tools)
                assert ok(await a.call_tool("box_list", {})) == []
                assert "No box matches" in failed(await b.call_tool("box_status", {"box": "nope"}))

        run(main)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr.read()

    # The token is made once: a second server (or a race of two) reads the same file.
    from worktreebox.mcp.auth import ensure_token

    assert ensure_token(wtbox_home) == (token, False)
    token_file.chmod(0o644)
    with pytest.raises(Exception, match="can be read by other users"):
        ensure_token(wtbox_home)
