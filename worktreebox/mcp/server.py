"""`wtbox mcp`: every wtbox operation as a Model Context Protocol tool, on the official `mcp` SDK.

Tools return the objects the CLI's `--json` prints (a list comes wrapped as {"result": [...]},
as MCP's structured content must be an object). Errors come back as tool errors carrying
wtbox's one-sentence message; the server itself never dies of one. Live boxes' status, env and
recent logs are also resources (wtbox://box/<id>/status, .../env, .../logs/<service>).

The tools are made from the operations' declarations (tools.py), the resources are in
resources.py, and how a call runs (a thread, a Host of its own, cancellation, progress) is
calls.py. Only mcp/ and the `mcp` command import the SDK, and the tools import the rest of wtbox
when first called: an agent's client starts this server often, and the time to the first tool
list should be the SDK's own.

A cancelled `box_new` rolls back exactly as Ctrl-C does, a cancelled `box_exec` stops its
command, a cancelled `fanout` stops its runs as Ctrl-C does.
"""
import json
import sys
from collections.abc import Callable
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import CallToolResult, Resource, TextContent
from pydantic import AnyHttpUrl, ValidationError

NAME = "wtbox"
INSTRUCTIONS = (
    "wtbox makes disposable development boxes on this host: each is a git worktree on its own "
    "branch with leased ports, its own PostgreSQL schema, caches, services with captured logs and "
    "its own metrics store. Make one with box_new, run commands in it with box_exec, read its "
    "logs and metrics, and remove it with box_rm. A `box` argument is a box id, a unique id "
    "prefix, or the task name the box was made for."
)

class WtboxMCP(MCPServer):
    """The SDK's server plus wtbox's error wording and the live boxes' resources."""

    def __init__(self, *, allow_secrets: bool = False, **kwargs: Any) -> None:
        super().__init__(NAME, instructions=INSTRUCTIONS, version=_version(), log_level="WARNING", **kwargs)
        self.allow_secrets = allow_secrets

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
        """Every failure as a tool error with one sentence: wtbox's own message, the bad argument,
        or (for a bug) the exception's type and text; never a traceback on the wire."""
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as e:
            cause = e.__cause__
            if type(e) is ToolError and isinstance(cause, ValidationError):  # the arguments, not our code
                return tool_error(argument_error(name, cause))
            from worktreebox.errors import WtboxError

            if isinstance(cause, WtboxError):
                return tool_error(str(cause))
            if cause is None:  # the SDK's own (an unknown tool)
                return tool_error(str(e))
            return tool_error(internal_error(cause, name, arguments))

    async def list_resources(self) -> list[Resource]:
        """The static resources plus status, env and logs of every live box."""
        static = await super().list_resources()
        from worktreebox.mcp.resources import live_resources

        return static + await anyio.to_thread.run_sync(live_resources)


def internal_error(error: BaseException, tool: str, arguments: dict[str, Any]) -> str:
    """A bug's one sentence, naming the crash log it wrote (diagnostics.py); with debugging on,
    the traceback on the server's stderr too."""
    from worktreebox import diagnostics

    message = diagnostics.internal_error(error, ["wtbox", "mcp", tool, json.dumps(arguments, default=str)])
    if diagnostics.debugging():
        import traceback

        traceback.print_exception(error, file=sys.stderr)
    return message


def tool_error(message: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=message)], is_error=True)


def argument_error(tool: str, e: ValidationError) -> str:
    """The first complaint of pydantic as one sentence naming the argument."""
    err = e.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "arguments"
    msg = str(err.get("msg", "is not valid")).rstrip(".")
    if err.get("type") == "missing":
        return f"{tool}: the argument {where!r} is required."
    if err.get("type") == "extra_forbidden":
        return f"{tool}: there is no argument {where!r}."
    return f"{tool}: the argument {where!r} is not valid: {msg}."


def _version() -> str:
    from worktreebox import __version__

    return __version__


# ---------------------------------------------------------------------- the server

def build_server(*, allow_secrets: bool = False, **kwargs: Any) -> WtboxMCP:
    """The server with every tool and resource template registered (no transport yet)."""
    from worktreebox.mcp.resources import TEMPLATES
    from worktreebox.mcp.tools import ANNOTATIONS, all_tools

    server = WtboxMCP(allow_secrets=allow_secrets, **kwargs)
    for fn, op in all_tools():
        server.add_tool(fn, annotations=ANNOTATIONS[op.effect])
    for uri, fn, mime, doc in TEMPLATES:
        server.resource(uri, name=fn.__name__.removesuffix("_resource").replace("_", "-"), mime_type=mime,
                        description=doc)(fn)
    return server


def serve_stdio(*, allow_secrets: bool = False) -> None:
    """Serve on stdin/stdout until the client closes them (the SDK keeps stray writes off stdout)."""
    build_server(allow_secrets=allow_secrets).run("stdio")


# ---------------------------------------------------------------------- HTTP: loopback + token

def http_app(server: WtboxMCP, host: str, port: int):
    """The streamable HTTP app at /mcp: bearer token required, Host and Origin limited to this
    loopback address (the SDK's DNS-rebinding protection)."""
    names = ["127.0.0.1", "localhost"] if host == "127.0.0.1" else ["[::1]", "localhost"]
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[f"{n}:{port}" for n in names],
        allowed_origins=[f"http://{n}:{port}" for n in names],
    )
    return server.streamable_http_app(streamable_http_path="/mcp", transport_security=security, host=host)


def serve_http(host: str, port: int, token: str, *, allow_secrets: bool = False,
               ready: Callable[[str], None] | None = None) -> None:
    """Serve streamable HTTP on a loopback address (mcp_auth.parse_bind) until SIGINT/SIGTERM;
    `ready(url)` once the socket listens."""
    import socket

    import uvicorn

    from worktreebox.errors import WtboxError
    from worktreebox.mcp.auth import StaticToken

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise WtboxError(f"Cannot listen on {host}:{port}: {e.strerror}; pick another port.") from None
    sock.listen(128)
    port = sock.getsockname()[1]  # the real one when 0 was asked for
    origin = f"http://{f'[{host}]' if family == socket.AF_INET6 else host}:{port}"
    server = build_server(allow_secrets=allow_secrets, token_verifier=StaticToken(token),
                          auth=AuthSettings(issuer_url=AnyHttpUrl(origin), resource_server_url=None))
    config = uvicorn.Config(http_app(server, host, port), log_level="warning", access_log=False, lifespan="on")
    if ready:
        ready(origin + "/mcp")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it shut down on
        pass
