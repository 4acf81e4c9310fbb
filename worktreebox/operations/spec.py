"""How an operation is declared: its parameters, help, result and effect, once for both front ends.

An `Operation` is data plus the function that performs it; the click command is made from it by
`cli/build.py` and the MCP tool by `mcp/tools.py`. Stdlib only, and nothing is imported at module
level beyond it: `wtbox ls` imports its declaration on every run.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from worktreebox.errors import ParamError, UsageError

T = TypeVar("T")

# What an operation does to the host (the MCP tool's annotations; the CLI shows none).
READ_ONLY, CHANGES, DESTROYS = "read-only", "changes", "destroys"


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # the default of a parameter that must be given


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter: `name` is how MCP spells it and how the performing function receives it."""

    name: str
    help: str
    type: type = str  # str, int, float or bool; with `many`, the type of each value
    default: Any = None
    positional: bool = False  # a CLI argument (TASK, BOX, PATH) rather than an --option
    many: bool = False  # several values: a repeatable option / trailing arguments; MCP: a list or one value
    flags: tuple[str, ...] = ()  # the CLI's spellings when not --name-with-dashes, e.g. ("--from",)
    metavar: str | None = None
    choices: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    cwd: bool = False  # a BOX the CLI may leave out inside a box (the cwd names it); MCP always asks for it

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def cli_flags(self) -> tuple[str, ...]:
        return self.flags or ("--" + self.name.replace("_", "-"),)

    def cli_spelling(self) -> str:
        """How a message names it in the CLI: BOX for an argument, its long flag for an option."""
        if self.positional:
            return self.metavar or self.name.upper()
        return next((f for f in self.cli_flags if f.startswith("--")), self.cli_flags[0])


@dataclasses.dataclass(frozen=True)
class Operation:
    """One thing wtbox does, as both front ends offer it.

    `perform(host, **params)` does it (it calls Host, fleet and telemetry, never click or mcp) and
    returns `returns`: what `--json` prints and what the tool returns. `result` says it in words
    (the tool's description adds it to `help`). Parameters only one front end has stay in that
    front end and are listed in operations/exceptions.py.
    """

    name: str  # the CLI command: "new", "db start"
    help: str
    params: tuple[Param, ...]
    perform: Callable[..., Any]
    returns: Any = dict[str, Any]
    result: str = ""
    effect: str = READ_ONLY
    tool: str | None = None  # the MCP tool's name; None when only the CLI offers it (exceptions.py)

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)

    def cli_spelling(self, name: str) -> str:
        """A parameter as the CLI spells it (also one this operation does not declare, e.g. a CLI extra)."""
        found = [p for p in self.params if p.name == name]
        return found[0].cli_spelling() if found else "--" + name.replace("_", "-")

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params if not p.required}


def as_list(value: str | Sequence[str] | None) -> list[str]:
    """A `many` parameter's values: MCP may send one value or a list, the CLI a tuple."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def parsed(name: str, parse: Callable[..., T], value: Any, *, where: str = "where", **kw: Any) -> T:
    """`value` through a parser that names what it reads through its `where` argument (parse_duration,
    ...); its complaint names the parameter, as each front end spells it."""
    try:
        return parse(value, **{where: "{" + name + "}"}, **kw)
    except ParamError:
        raise
    except UsageError as e:
        raise ParamError(str(e), name) from None


# ---------------------------------------------------------------------- parameters many operations take

BOX = Param("box", "The box: its id, a unique id prefix, or its task name.", default=REQUIRED, positional=True,
            cwd=True)
SHOW_SECRETS = Param("show_secrets", "Show passwords and secret values in the output (MCP: only on a server "
                                     "started with --allow-secrets).", bool, False)
REPO = Param("repo", "Repository to cut the box from (default: the one around the working directory).")
REF = Param("ref", "Git ref to start from (default: HEAD).", flags=("--from",))
NO_POOL = Param("no_pool", "Always make a fresh box, never one from the warm pool.", bool, False)
NO_WAIT = Param("no_wait", "Refuse at once when the host is full ([host] max_active / max_load) instead of "
                           "waiting for room.", bool, False)
