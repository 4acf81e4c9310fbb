"""Commands on the host router: url, open."""
from __future__ import annotations

import os
import shlex
import shutil

import click

from worktreebox.cli.commands._common import box_argument, emit_json, get_host, info, json_option, run_cmd

show_token_option = click.option("--show-token", is_flag=True,
                                  help="Also print the token the router asks for when it listens beyond the loopback.")


@click.command()
@box_argument
@click.argument("service", required=False)
@show_token_option
@json_option
@run_cmd
def url(box, service, show_token, as_json):
    """Print the URL of a box (or of one SERVICE of it) through the host router."""
    host = get_host()
    out = host.url(host.get(box), service, show_token=show_token)
    _print(out, as_json)


@click.command(name="open")
@box_argument
@click.argument("service", required=False)
@show_token_option
@json_option
@run_cmd
def open_(box, service, show_token, as_json):
    """Print the URL of a box and open it in a browser ($BROWSER, else xdg-open on a desktop)."""
    host = get_host()
    out = host.url(host.get(box), service, show_token=show_token)
    out["opened_with"] = open_in_browser(out["url"])
    _print(out, as_json)
    if out["opened_with"] is None and not as_json:
        info("no browser here ($BROWSER unset, no desktop): open the URL where you are, through "
             f"'ssh -L {out['router']['port']}:127.0.0.1:{out['router']['port']} <this host>'")


def _print(out: dict, as_json: bool) -> None:
    if as_json:
        emit_json(out)
        return
    click.echo(out["url"])
    if out.get("token_needed"):
        info(f"the router asks for a token: user wtbox, password {out.get('token') or 'shown by --show-token'}")


def open_in_browser(target: str) -> str | None:
    """Start $BROWSER (its first entry, as Python's webbrowser reads it), else xdg-open when a
    desktop session is at hand, with the URL; the program's name, or None when there is none.
    Nothing is opened in the terminal (a remote host's text browser is no help)."""
    from worktreebox.system import procs

    argv = None
    browser = os.environ.get("BROWSER", "").split(os.pathsep)[0].strip()
    if browser:
        argv = shlex.split(browser.replace("%s", target)) if "%s" in browser else [*shlex.split(browser), target]
    elif (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) and shutil.which("xdg-open"):
        argv = ["xdg-open", target]
    if not argv or not shutil.which(argv[0]):
        return None
    procs.spawn(argv)
    return argv[0]
