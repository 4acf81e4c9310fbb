"""What the router's tests share (tests/router/): a two-service repo config and Caddy's pid."""
from __future__ import annotations

import sys
from pathlib import Path

from helpers import APPS

from worktreebox.router.state import read_state
from worktreebox.system import procs

APP = APPS / "router_app.py"


def router_toml(extra: str = "", name: str = " {{ box.id }}") -> str:
    """Two services: `web` (a page naming the box, server-sent events) and `ws` (a WebSocket echo).
    Without `name` the page names the box by its WTBOX_ID."""
    return ('[box]\nports = ["web", "ws"]\n[database]\nmode = "none"\n[observability]\nenabled = false\n'
            f'[services.web]\ncmd = "{sys.executable} {APP} http {{{{ ports.web }}}}{name}"\n'
            'ready = "http://127.0.0.1:{{ ports.web }}/"\n'
            f'[services.ws]\ncmd = "{sys.executable} {APP} ws {{{{ ports.ws }}}}"\n'
            'ready = "tcp:{{ ports.ws }}"\n' + extra)


def caddy_pid(home: Path) -> int | None:
    ident = read_state(home).get("pid")
    return ident[0] if procs.is_alive(ident) else None
