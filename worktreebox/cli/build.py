"""The click command of an operation, made from its declaration (operations/spec.py).

    @command(boxes.STATUS)
    def status(box, show_secrets, as_json): ...   # renders; the operation performs

Each declared parameter becomes an argument (positional) or an option (its flags, type, range or
choices, default, help); `extras` are click decorators for what only the CLI has (operations/
exceptions.py lists them); `--json` is added unless the command prints its own way. A WtboxError
becomes 'wtbox: <sentence>' and its exit code, a ParamError spelled with the CLI's flags.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any

import click

from worktreebox.errors import ParamError, WtboxError
from worktreebox.operations.spec import Operation, Param

JSON_HELP = "Print one JSON document on stdout."


def command(op: Operation, *, extras: Sequence[Callable[[Any], Any]] = (), json: bool = True, name: str | None = None,
            several: Sequence[str] = (), **settings: Any) -> Callable[[Callable[..., Any]], click.Command]:
    """Decorator: `body(**params)` as the click command of `op` (named after its last word).
    `several`: positional parameters the CLI takes more than one of (rm BOX...)."""

    def wrap(body: Callable[..., Any]) -> click.Command:
        fn = errors_as_sentences(op)(body)
        if json:
            fn = click.option("--json", "as_json", is_flag=True, help=JSON_HELP)(fn)
        for extra in reversed(extras):
            fn = extra(fn)
        params = [click_param(dataclasses.replace(p, many=True, default=()) if p.name in several else p)
                  for p in op.params]
        return click.command(name=name or op.name.split()[-1], help=op.help, params=params, **settings)(fn)

    return wrap


def click_param(p: Param) -> click.Parameter:
    if p.positional:
        required = p.required and not p.cwd  # a BOX left out: the box around the cwd
        extra = {} if p.many or p.required or p.default is None else {"default": p.default}
        return click.Argument([p.name], required=required, nargs=-1 if p.many else 1, type=_type(p),
                              metavar=p.metavar, **extra)
    if p.type is bool:
        return click.Option([*p.cli_flags, p.name], is_flag=True, default=bool(p.default), help=p.help)
    shown = p.default not in (None, (), False) and not p.required
    return click.Option([*p.cli_flags, p.name], type=_type(p), required=p.required, multiple=p.many,
                        default=None if p.required or p.many else p.default, show_default=shown, metavar=p.metavar,
                        help=p.help)


def _type(p: Param) -> Any:
    if p.choices:
        return click.Choice(p.choices)
    if p.min is not None or p.max is not None:
        if p.type is int:  # an int parameter's bounds are whole numbers
            return click.IntRange(min=None if p.min is None else int(p.min), max=None if p.max is None else int(p.max))
        return click.FloatRange(min=p.min, max=p.max)
    return p.type


def errors_as_sentences(op: Operation | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """WtboxError -> 'wtbox: <sentence>' on stderr and its exit code (1 or 2)."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except WtboxError as e:
                text = e.spelled(op.cli_spelling if op else _flag) if isinstance(e, ParamError) else str(e)
                click.echo(f"wtbox: {text}", err=True)
                sys.exit(e.exit_code)

        return run

    return wrap


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
