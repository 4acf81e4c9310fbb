"""`wtbox mcp`: serve every wtbox operation to agents over the Model Context Protocol."""
from __future__ import annotations

import sys

import click

from worktreebox.cli.commands._common import emit_json, info, json_option, run_cmd


@click.command()
@click.option("--http", "bind", metavar="127.0.0.1:PORT",
              help="Serve streamable HTTP at http://127.0.0.1:PORT/mcp (loopback only; bearer token from "
                   "$WTBOX_HOME/mcp-token) instead of stdio.")
@click.option("--allow-secrets", is_flag=True,
              help="Let a tool call that sets show_secrets see passwords and secret values.")
@json_option
@run_cmd
def mcp(bind, allow_secrets, as_json):
    """Serve wtbox's operations as MCP tools (stdio by default, for an agent's client to start).

    With --json and --http, one document {url, token_file, token_created} once it listens; on
    stdio, stdout is the protocol itself."""
    if bind is None:
        from worktreebox.mcp import server as mcp_server

        mcp_server.serve_stdio(allow_secrets=allow_secrets)
        return

    from worktreebox.host import default_home
    from worktreebox.mcp.auth import ensure_token, parse_bind, token_path

    host, port = parse_bind(bind)  # refused before anything starts
    home = default_home()
    token, created = ensure_token(home)
    if created:  # shown this once; afterwards it is only in the 0600 file
        info(f"wtbox: new MCP bearer token (kept in {token_path(home)}, mode 0600): {token}")

    def ready(url: str) -> None:
        info(f"wtbox: MCP server on {url} (header 'Authorization: Bearer <token>'; Ctrl-C stops it)")
        if as_json:
            emit_json({"url": url, "token_file": str(token_path(home)), "token_created": created})
            sys.stdout.flush()

    from worktreebox.mcp import server as mcp_server

    mcp_server.serve_http(host, port, token, allow_secrets=allow_secrets, ready=ready)
