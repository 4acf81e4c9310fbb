"""`wtbox mcp` as a real stdio subprocess through the official SDK's client, for the tests of
every part that has an MCP tool (tests/mcp/test_server.py, tests/telemetry/test_traces.py)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from mcp import Client
from mcp.client.stdio import StdioServerParameters


def server_env(home: Path) -> dict[str, str]:
    """What the SDK's stdio client passes on: its safe defaults plus these."""
    keep = ("PATH", "WTBOX_PORT_RANGE", "WTBOX_POSTGRES_URL", "WTBOX_SANDBOX_SPARES")
    return {"WTBOX_HOME": str(home), "WTBOX_NO_AUTO_GC": "1", **{k: os.environ[k] for k in keep if k in os.environ}}


def stdio_client(home: Path, *args: str) -> Client:
    return Client(StdioServerParameters(command=sys.executable, args=["-m", "worktreebox.cli.main", "mcp", *args],
                                        env=server_env(home)))


def ok(result) -> object:
    """The structured result of a successful call (a list comes wrapped as {"result": [...]})."""
    assert not result.is_error, result.content[0].text
    data = result.structured_content
    return data["result"] if set(data) == {"result"} else data


def failed(result) -> str:
    assert result.is_error, result.structured_content
    [content] = result.content
    assert "Traceback" not in content.text
    return content.text
