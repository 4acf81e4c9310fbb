"""Errors that the CLI turns into one sentence and an exit code (never a traceback)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable


class WtboxError(Exception):
    """An operation failed (exit 1). The message is one sentence meant for the user."""

    exit_code = 1


class Interrupted(WtboxError):
    """Ctrl-C stopped the operation (exit 130, as a shell reports SIGINT); the message says what is left."""

    exit_code = 130


class UsageError(WtboxError):
    """Bad input from the user: a task name, a BOX that doesn't resolve, a flag (exit 2)."""

    exit_code = 2


class ParamError(UsageError):
    """Bad input that is about an operation's parameters: the message names them as `{name}`,
    and each front end spells them its own way (`--diff` in the CLI, `diff` in MCP).

    str() gives the plain names, for a reader that knows no front end."""

    def __init__(self, template: str, *params: str) -> None:
        self.template, self.params = template, params
        super().__init__(self.spelled(lambda name: name))

    def spelled(self, spell: Callable[[str], str]) -> str:
        text = self.template
        for name in self.params:
            text = text.replace("{" + name + "}", spell(name))
        return text


class ConfigError(UsageError):
    """A wtbox.toml or host config problem: names the file, the key and what was expected (exit 2)."""


class NotFound(UsageError):
    """A BOX argument that matches no box."""


class UnsavedWork(WtboxError):
    """rm/gc refused because the worktree holds work that exists nowhere else."""
