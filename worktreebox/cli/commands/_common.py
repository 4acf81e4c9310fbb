"""Shared pieces of the CLI commands: --json, BOX resolution, output, error handling."""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
box_argument = click.argument("box", required=False)


def get_host():
    from worktreebox.host import Host

    return Host()


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def info(msg: str) -> None:
    """Progress and notes go to stderr so --json stdout stays one document."""
    click.echo(msg, err=True)


def run_cmd(fn: Callable) -> Callable:
    """Turn WtboxError into 'wtbox: <sentence>' on stderr and its exit code (1 or 2)."""
    from worktreebox.cli.build import errors_as_sentences

    return errors_as_sentences()(fn)


def table(rows: list[list[str]], headers: list[str]) -> None:
    """A plain aligned table (rich only when the output is a terminal: it costs ~60 ms to import)."""
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        t = Table(box=None, header_style="bold")
        for h in headers:
            t.add_column(h)
        for r in rows:
            t.add_row(*[str(c) for c in r])
        Console().print(t)
        return
    widths = [max([len(h)] + [len(str(r[i])) for r in rows]) for i, h in enumerate(headers)]
    for r in [headers, *rows]:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
