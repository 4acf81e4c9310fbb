"""The two front ends made from one declaration: every CLI command's options against every MCP
tool's parameters (name, default, presence), with only the written exceptions
(operations/exceptions.py); and parameter errors spelled by each front end."""
from __future__ import annotations

import subprocess
import sys

import anyio
import click
import click.core
import pytest

from worktreebox.cli import main as cli
from worktreebox.errors import ParamError
from worktreebox.operations import all_operations
from worktreebox.operations.exceptions import EXCEPTIONS

MISSING = "<missing>"
REQUIRED = "<required>"


def cli_commands() -> dict[str, click.Command]:
    """Every command and group subcommand, by its full name ("new", "db start")."""
    ctx = click.Context(cli.main)
    out = {}
    for name in cli.main.list_commands(ctx):
        cmd = cli.main.get_command(ctx, name)
        assert cmd is not None, f"the command table names {name!r}, which does not import"
        if isinstance(cmd, click.Group):
            out.update({f"{name} {sub}": c for sub, c in cmd.commands.items()})
        else:
            out[name] = cmd
    return out


def normal(value):
    """Defaults as comparable values: no value, an empty list and None are all 'nothing'."""
    unset = getattr(click.core, "UNSET", None)  # click 8.3: what an argument without a default has
    return None if value is unset or value in ((), [], None, False) else value


def cli_params(cmd: click.Command) -> dict[str, object]:
    ctx = click.Context(cmd)
    return {p.name: REQUIRED if p.required else normal(p.get_default(ctx)) for p in cmd.params
            if p.name != "help"}


def mcp_params() -> dict[str, dict[str, object]]:
    from worktreebox.mcp.server import build_server

    async def tools():
        return await build_server().list_tools()

    out = {}
    for t in anyio.run(tools):
        required = set(t.input_schema.get("required", []))
        out[t.name] = {name: REQUIRED if name in required else normal(schema.get("default"))
                       for name, schema in t.input_schema["properties"].items()}
    return out


def differences() -> set[str]:
    commands, tools = cli_commands(), mcp_params()
    declared = {op.name: op for op in all_operations()}
    found = set()
    for name, cmd in commands.items():
        op = declared.get(name)
        if op is None or op.tool is None:
            found.add(name)  # a command with no tool
            continue
        assert op.tool in tools, f"{op.tool} is declared but not served"
        ours, theirs = cli_params(cmd), tools.pop(op.tool)
        for param in ours.keys() | theirs.keys():
            if ours.get(param, MISSING) != theirs.get(param, MISSING):
                found.add(f"{name}.{param}")
    assert not tools, f"tools with no CLI command: {sorted(tools)}"
    return found


def test_cli_and_mcp_differ_only_where_written():
    found = differences()
    excused = {d for d in found if d in EXCEPTIONS or f"*.{d.rpartition('.')[2]}" in EXCEPTIONS}
    assert found - excused == set(), "differences between the CLI and MCP not in operations/exceptions.py"
    stale = {k for k in EXCEPTIONS if not k.startswith("*.") and k not in found}
    assert stale == set(), "exceptions that no longer differ: remove them"


def test_the_drift_test_sees_a_drift(monkeypatch):
    """A parameter the CLI gains alone is a difference the test names."""
    from worktreebox.operations import fleet

    before = differences()
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))
    original = cli.main.get_command

    def with_extra(self, ctx, name):
        cmd = original(ctx, name)
        if name == fleet.COMPARE.name:
            cmd = click.Command(cmd.name, params=[*cmd.params, click.Option(["--extra"])], callback=cmd.callback)
        return cmd

    monkeypatch.setattr(cli.LazyGroup, "get_command", with_extra)
    assert differences() - before == {"compare.extra"}


def test_every_command_is_declared_once():
    names = [op.name for op in all_operations()]
    assert len(names) == len(set(names))
    tools = [op.tool for op in all_operations() if op.tool]
    assert len(tools) == len(set(tools))
    for op in all_operations():
        assert op.help and all(p.help for p in op.params), op.name


@pytest.mark.parametrize("front, expected", [
    ("cli", "--diff needs --compare: a diff is between two boxes."),
    ("mcp", "diff needs compare: a diff is between two boxes."),
])
def test_a_parameter_error_is_spelled_by_each_front_end(front, expected):
    from worktreebox.operations import observe

    e = ParamError("{diff} needs {compare}: a diff is between two boxes.", "diff", "compare")
    assert (e.spelled(observe.BROWSE.cli_spelling) if front == "cli" else str(e)) == expected


def test_cli_usage_error_names_the_flag(wtbox_home, run_wtbox):
    r = run_wtbox("browse", "nope", "--diff", "d.png", check=False)
    assert r.returncode == 2 and r.stderr == "wtbox: --diff needs --compare: a diff is between two boxes.\n"
    r = run_wtbox("traces", "nope", "--logs", check=False)
    assert r.returncode == 2 and "--logs goes with --trace" in r.stderr
    r = run_wtbox("fanout", "t", "-n", "1", "--warm", "--no-pool", check=False)
    assert r.returncode == 2 and "--warm fills the pool and --no-pool ignores it" in r.stderr


def test_ls_imports_no_heavy_module():
    """`wtbox ls` in process: its declaration costs no third-party import beyond click."""
    code = ("import sys; from worktreebox.cli import main; main.main.get_command(None, 'ls'); "
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('psycopg', 'jinja2', 'rich', 'mcp', 'pydantic', 'anyio', 'psutil'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""
