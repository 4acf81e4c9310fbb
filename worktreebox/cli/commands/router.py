"""`wtbox url|open BOX [SERVICE]`: a box's address through the host router."""
from __future__ import annotations

import click

from worktreebox.cli.build import command
from worktreebox.cli.commands._common import emit_json, get_host, info
from worktreebox.operations import router


@command(router.URL)
def url(box, service, show_secrets, as_json):
    _print(router.url(get_host(), box, service, show_secrets), as_json)


@command(router.OPEN, name="open")
def open_(box, service, show_secrets, as_json):
    out = router.open_(get_host(), box, service, show_secrets)
    _print(out, as_json)
    if out["opened_with"] is None and not as_json:
        port = out["router"]["port"]
        info(f"no browser here ($BROWSER unset, no desktop): open the URL where you are, through "
             f"'ssh -L {port}:127.0.0.1:{port} <this host>'")


def _print(out: dict, as_json: bool) -> None:
    if as_json:
        emit_json(out)
        return
    click.echo(out["url"])
    if out.get("token_needed"):
        info(f"the router asks for a token: user wtbox, password {out.get('token') or 'shown by --show-secrets'}")
