"""Errors that the CLI turns into one sentence and an exit code (never a traceback)."""
from __future__ import annotations


class WtboxError(Exception):
    """An operation failed (exit 1). The message is one sentence meant for the user."""

    exit_code = 1


class Interrupted(WtboxError):
    """Ctrl-C stopped the operation (exit 130, as a shell reports SIGINT); the message says what is left."""

    exit_code = 130


class UsageError(WtboxError):
    """Bad input from the user: a task name, a BOX that doesn't resolve, a flag (exit 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A wtbox.toml or host config problem: names the file, the key and what was expected (exit 2)."""


class NotFound(UsageError):
    """A BOX argument that matches no box."""


class UnsavedWork(WtboxError):
    """rm/gc refused because the worktree holds work that exists nowhere else."""
