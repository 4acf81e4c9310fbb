"""`wtbox mcp`: spawn-to-first-tool-list against a one-tool server on the same SDK (the floor:
the SDK's own import and handshake; target <= 1.3 x floor + 100 ms), and `box_status` through
an open MCP session against `wtbox status --json` (target <= 1.2 x)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE_TOML = '[database]\nmode = "none"\n[observability]\nenabled = false\n'
# The floor: the same SDK, the same transport, one tool.
FLOOR_SERVER = '''
from mcp.server.mcpserver import MCPServer

server = MCPServer("floor")


@server.tool()
def ping() -> str:
    """Answer pong."""
    return "pong"


server.run("stdio")
'''


def _p50(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2]


def _ms(values: list[float]) -> dict:
    v = sorted(values)
    return {"p50_ms": round(_p50(v) * 1000, 1), "p90_ms": round(v[min(len(v) - 1, int(len(v) * 0.9))] * 1000, 1),
            "n": len(v)}


def bench_mcp(runs: int = 10, work: Path | None = None) -> dict:
    import anyio
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters

    work = Path(work or tempfile.gettempdir())
    tmp = Path(tempfile.mkdtemp(prefix="wtbox-bench-mcp-", dir=work))
    home = tmp / "home"
    env = {"WTBOX_HOME": str(home), "WTBOX_NO_AUTO_GC": "1", "PATH": os.environ["PATH"]}
    floor_py = tmp / "floor_server.py"
    floor_py.write_text(FLOOR_SERVER)
    repo = tmp / "repo"
    repo.mkdir()
    (repo / "wtbox.toml").write_text(CORE_TOML)
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "x"]):
        subprocess.run(["git", "-C", str(repo), "-c", "user.email=b@e", "-c", "user.name=b", *args], check=True)
    sys.path.insert(0, str(ROOT))
    from worktreebox.host import Host

    host = Host(home)
    box = host.new("bench-mcp", repo=repo)

    def server(args: list[str]) -> Client:
        return Client(StdioServerParameters(command=sys.executable, args=args, env=env))

    async def first_list(args: list[str]) -> float:
        t0 = time.perf_counter()
        async with server(args) as client:
            tools = await client.list_tools()
            took = time.perf_counter() - t0
        assert tools.tools
        return took

    async def spawn_to_list() -> tuple[list[float], list[float]]:
        floor, ours = [], []
        for _ in range(runs):  # interleaved, so machine noise falls on both alike
            floor.append(await first_list([str(floor_py)]))
            ours.append(await first_list(["-m", "worktreebox.cli.main", "mcp"]))
        return floor, ours

    async def status_calls() -> list[float]:
        out = []
        async with server(["-m", "worktreebox.cli.main", "mcp"]) as client:
            await client.call_tool("box_status", {"box": box.id})  # warm: first imports of the tool
            for _ in range(runs * 3):
                t0 = time.perf_counter()
                r = await client.call_tool("box_status", {"box": box.id})
                out.append(time.perf_counter() - t0)
                assert not r.is_error and r.structured_content["id"] == box.id
        return out

    try:
        floor, ours = anyio.run(spawn_to_list)
        mcp_status = anyio.run(status_calls)
        cli_status = []
        for _ in range(runs * 3):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "worktreebox.cli.main", "status", box.id, "--json"],
                                  env={**os.environ, **env}, capture_output=True, text=True)
            cli_status.append(time.perf_counter() - t0)
            assert proc.returncode == 0, proc.stderr
        direct = []
        for _ in range(runs * 3):  # what the call itself costs, without any transport
            t0 = time.perf_counter()
            host.describe(host.get(box.id))
            direct.append(time.perf_counter() - t0)
    finally:
        host.rm(box, force=True)
        host.registry.close()
        subprocess.run(["rm", "-rf", str(tmp)])
    out = {
        "floor_spawn_to_tools": _ms(floor), "wtbox_spawn_to_tools": _ms(ours),
        "box_status_in_session": _ms(mcp_status), "wtbox_status_json": _ms(cli_status),
        "host_describe_in_process": _ms(direct),
    }
    target = 1.3 * out["floor_spawn_to_tools"]["p50_ms"] + 100
    out["spawn_target_ms"] = round(target, 1)
    out["spawn_ratio"] = round(out["wtbox_spawn_to_tools"]["p50_ms"] / out["floor_spawn_to_tools"]["p50_ms"], 2)
    out["spawn_ok"] = out["wtbox_spawn_to_tools"]["p50_ms"] <= target
    out["status_ratio"] = round(out["box_status_in_session"]["p50_ms"] / out["wtbox_status_json"]["p50_ms"], 2)
    out["status_ok"] = out["status_ratio"] <= 1.2
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(bench_mcp(int(sys.argv[1]) if len(sys.argv) > 1 else 10), indent=2))
