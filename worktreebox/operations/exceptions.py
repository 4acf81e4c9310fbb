"""What only one front end has, on purpose: the one written list.

Every other parameter of an operation is declared once (operations/*.py) and both the click
command and the MCP tool are made from it; tests/operations/test_operations.py compares the two front ends
and fails on any difference in name, default or presence that is not listed here (and on an
entry here that no longer differs). Keys are "command.parameter" as the front end names it
("*.parameter": in every command), or a command alone.
"""
from __future__ import annotations

EXCEPTIONS: dict[str, str] = {
    # in every command
    "*.as_json": "CLI only: --json picks JSON over a table; a tool always returns JSON.",
    "*.box": "The CLI may leave BOX out inside a box (the cwd names it); MCP's server has no such cwd.",
    # commands the CLI alone has
    "shell": "CLI only: becomes your shell in the box (it replaces the process and takes the terminal).",
    "keep": "CLI only for now: marks a box for gc.",
    "unkeep": "CLI only for now: unmarks a box for gc.",
    "init": "CLI only: writes a file in your repository.",
    "open": "CLI only: starts a browser where the CLI runs (an agent opens box_url's URL itself).",
    "doctor": "CLI only: checks this host for its operator.",
    "top": "CLI only: a live view for a terminal (--watch).",
    "gc": "CLI only: the host's sweep (also run hourly by itself).",
    "pool": "CLI only: the host's warm pool, set up by its operator.",
    "db start": "CLI only: the host's PostgreSQL.",
    "db stop": "CLI only: the host's PostgreSQL.",
    "db status": "CLI only: the host's PostgreSQL.",
    "db refill": "Internal: started in the background by `new`.",
    "db drop-copies": "Internal: started in the background by `restore` and `db reset`.",
    "db psql": "CLI only: becomes psql on your terminal (it replaces the process, like `shell`).",
    "mcp": "The MCP server itself.",
    "server status": "The CLI's own server.",
    "server stop": "The CLI's own server.",
    # parameters one front end alone has, or defaults that differ
    "new.secrets": "CLI only: values from the caller's environment or files (an MCP call has neither).",
    "env.fmt": "CLI only: the text for eval (sh, dotenv, json).",
    "env.show_secrets": "MCP only: the CLI prints the env for eval, unmasked, to its owner's terminal.",
    "exec.cwd": "MCP only: `wtbox exec` becomes the command in the worktree; cd there in the command.",
    "exec.timeout": "MCP only: `wtbox exec` becomes the command; the terminal stops it.",
    "exec.tail": "MCP only: `wtbox exec` prints everything; a tool returns the last lines.",
    "exec.show_secrets": "MCP only: `wtbox exec` gives the command the real values, as the box's services get.",
    "rm.box": "The CLI removes several boxes at once (BOX...); a tool call removes one.",
    "rm.all_": "CLI only: every box, confirmed on the terminal.",
    "rm.yes": "CLI only: the confirmation of --all.",
    "logs.follow": "CLI only: keeps printing until Ctrl-C.",
    "logs.tail": "MCP defaults to the last 200 records (an agent's context), the CLI prints all.",
    "metrics.list_": "CLI only: MCP lists the metric names when no query is given.",
    "up.secrets": "CLI only: values from the caller's environment or files.",
    "restart.secrets": "CLI only: values from the caller's environment or files.",
    "pick.yes": "CLI only: the confirmation asked on the terminal.",
}
