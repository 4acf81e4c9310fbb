"""wtbox's own diagnostics: the `wtbox` logger hierarchy on stderr, and the crash log.

Modules log through `logger("<part>")`: the standard `logging` module's `wtbox.<part>` logger,
looked up when a line is logged, so that a command logging nothing never imports `logging`
(~2.6 ms of CPU in every in-process `wtbox ls`, measured). Nothing shows but warnings unless
WTBOX_DEBUG=1 or `wtbox -v` turns on debug.

An internal error (an exception no command expected) writes $WTBOX_HOME/wtbox.log, as
pre-commit writes pre-commit.log: wtbox's version, Python, the platform, the command (secrets
masked) and the traceback; its one sentence names that file. The next crash replaces it; it
never holds a secret value.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from worktreebox import settings

ROOT = "wtbox"
CRASH_LOG = "wtbox.log"
_FORMAT = "%(asctime)s.%(msecs)03d %(name)s %(levelname)s %(message)s"


class _Now:
    """This command's state: configure() resets it (a served command brings its own stderr and
    environment)."""

    debug = False  # debug lines on
    attached = False  # the `wtbox` logger writes to this command's stderr


class Logger:
    """logging.getLogger("wtbox.<part>"), used only when a line is logged; debug lines cost
    nothing when not debugging."""

    __slots__ = ("name",)

    def __init__(self, part: str) -> None:
        self.name = f"{ROOT}.{part}"

    def debug(self, msg: str, *args: Any) -> None:
        if _Now.debug:
            _logging().getLogger(self.name).debug(msg, *args)

    def warning(self, msg: str, *args: Any) -> None:
        _logging().getLogger(self.name).warning(msg, *args)


def logger(part: str) -> Logger:
    return Logger(part)


def configure(verbose: bool = False) -> None:
    """Debug lines on with `verbose` or WTBOX_DEBUG=1; the handler goes to this process's stderr
    when the first line is logged. Called per command."""
    _Now.debug, _Now.attached = verbose or settings.DEBUG.on(), False
    if _Now.debug or "logging" in sys.modules:
        _logging()


def debugging() -> bool:
    return _Now.debug


def _logging() -> ModuleType:
    """The logging module, with the `wtbox` logger writing to the current stderr."""
    import logging

    if not _Now.attached:
        log = logging.getLogger(ROOT)
        for old in list(log.handlers):
            log.removeHandler(old)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
        log.addHandler(handler)
        log.propagate = False  # the MCP SDK configures the root logger its own way
        log.setLevel(logging.DEBUG if _Now.debug else logging.WARNING)
        _Now.attached = True
    return logging


def internal_error(error: BaseException, command: Sequence[str]) -> str:
    """Write the crash log of `error` (raised by `command`) and return the sentence naming it."""
    mask = _masker(command)
    detail = mask(" ".join(str(error).split())[:300])
    path = write_crash_log(error, command, mask)
    where = f"details in {path}" if path else "set WTBOX_DEBUG=1 for a traceback"
    return f"internal error: {type(error).__name__}: {detail} ({where})."


def write_crash_log(error: BaseException, command: Sequence[str],
                    mask: Callable[[str], str] | None = None) -> str | None:
    """$WTBOX_HOME/wtbox.log (0600) for `error` (the home is made if a command crashed before it
    was); None when it cannot be written."""
    path = os.path.join(os.path.abspath(settings.default_home()), CRASH_LOG)
    text = (mask or _masker(command))(_report(error, command))
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        os.fchmod(fd, 0o600)  # one left by an older wtbox may have been readable by others
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
            f.write(text)
    except OSError:
        return None
    return path


def _report(error: BaseException, command: Sequence[str]) -> str:
    import platform
    import time
    import traceback

    trace = "".join(traceback.format_exception(error))
    return (f"### version information\n\nwtbox: {_version()}\npython: {sys.version.split()[0]} "
            f"({sys.executable})\nplatform: {platform.platform()}\ntime: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n\n"
            f"### error information\n\ncommand: {' '.join(masked_command(command))}\n"
            f"error: {type(error).__name__}: {error}\n\n{trace}")


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("worktreebox")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def masked_command(command: Sequence[str]) -> list[str]:
    """The command line with every value given inline to --secret, and every URL password, as ***."""
    from worktreebox.secrets import mask_urls_in

    out = []
    for i, arg in enumerate(command):
        if arg.startswith("--secret="):
            arg = "--secret=" + _masked_secret(arg.removeprefix("--secret="))
        elif i and command[i - 1] == "--secret":
            arg = _masked_secret(arg)
        out.append(mask_urls_in(arg))
    return out


def _masked_secret(spec: str) -> str:
    """NAME and NAME=@FILE name no secret; NAME=VALUE holds one."""
    from worktreebox.secrets import MASK

    name, eq, value = spec.partition("=")
    return f"{name}={MASK}" if eq and not value.startswith("@") else spec


def _masker(command: Sequence[str]) -> Callable[[str], str]:
    """Redacts what may be secret: this environment's secret-looking values and URL passwords,
    the values of variables named by --secret, and values given inline to --secret."""
    from worktreebox.secrets import Redactor, mask_urls_in, secret_values

    env = dict(os.environ)
    values = secret_values(env)
    for i, arg in enumerate(command):
        spec = arg.removeprefix("--secret=") if arg.startswith("--secret=") else \
            command[i + 1] if arg == "--secret" and i + 1 < len(command) else None
        if spec is not None:
            values.append(_secret_value(spec, env))
    redact = Redactor(values)
    return lambda text: mask_urls_in(redact(text))


def _secret_value(spec: str, env: dict[str, str]) -> str:
    """The value --secret SPEC stands for: NAME's in the environment, FILE's content, or inline."""
    name, _, source = spec.partition("=")
    if not source:
        return env.get(name, "")
    if source.startswith("@"):
        try:
            with open(source[1:], encoding="utf-8", errors="replace") as f:
                return f.read().rstrip("\n")
        except OSError:
            return ""
    return source
