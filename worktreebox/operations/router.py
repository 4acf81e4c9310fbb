"""A box's address through the host router: url, open."""
from __future__ import annotations

import os
import shlex
import shutil
from typing import TYPE_CHECKING

from worktreebox.operations.spec import BOX, SHOW_SECRETS, Operation, Param

if TYPE_CHECKING:
    from worktreebox.host import Host

SERVICE = Param("service", "One service (port name) of the box; default its first.", positional=True)
SHOWS_TOKEN = Param(SHOW_SECRETS.name, "Also give the token the router asks for when it listens beyond the "
                                       "loopback (MCP: only on a server started with --allow-secrets).", bool, False)


def url(host: Host, box: str | None, service: str | None = None, show_secrets: bool = False) -> dict:
    """The URL of the box or one service; the router is brought in step first, so it answers."""
    return host.url(host.get(box), service, show_token=show_secrets)


def open_(host: Host, box: str | None, service: str | None = None, show_secrets: bool = False) -> dict:
    """url(), opened in a browser where one is at hand (`opened_with`: its program, or None)."""
    out = url(host, box, service, show_secrets)
    out["opened_with"] = open_in_browser(out["url"])
    return out


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


_RESULT = ("{id, service, url, urls: {service: url}, router: {port, listen}}; token_needed (and token with "
           "show_secrets) when the router listens beyond the loopback.")
URL = Operation(
    "url", "The URL of a box (or of one SERVICE of it) through the host router: one SSH tunnel to the router's "
           "port reaches every box by name, e.g. http://web.fix-login.localhost:20017/.",
    (BOX, SERVICE, SHOWS_TOKEN), url, result=_RESULT, tool="box_url")
OPEN = Operation(
    "open", "Print the URL of a box and open it in a browser ($BROWSER, else xdg-open on a desktop).",
    (BOX, SERVICE, SHOWS_TOKEN), open_, result=_RESULT + " opened_with: the browser program, or null.")
