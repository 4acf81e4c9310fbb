"""What the router of a home is right now: where its files are and which Caddy runs it.

Cheap to import and to ask (a file read and a /proc read): every wtbox command asks
`needs_revive` before it runs.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from worktreebox.errors import WtboxError
from worktreebox.system import procs

PORT_OWNER = "@router"  # the host-level lease of its port when [host] router_port is not set
_SUN_PATH = 107  # a unix socket path has at most 107 bytes (108 with the NUL)


class Paths:
    """Where the router of one home keeps its things."""

    def __init__(self, home: Path) -> None:
        self.dir = Path(home) / "router"
        self.state = self.dir / "state.json"  # the running Caddy's identity, port, what was pushed
        self.lock = self.dir / "lock"
        self.log = self.dir / "caddy.log"  # Caddy's own log (warnings, errors; rolled at 1 MB)
        self.output = self.dir / "caddy.out"  # what it prints before its log is set up
        self.bootstrap = self.dir / "bootstrap.json"
        self.version = self.dir / "caddy-version.json"  # what `caddy version` said, for which binary
        self.starting = self.dir / "starting"  # there from before a Caddy is started until it is recorded
        self.caddy_home = self.dir / "caddy-home"  # its HOME and XDG dirs: it writes nothing elsewhere
        self.token = self.dir / "token"  # 0600: only when it listens beyond the loopback
        self.token_hash = self.dir / "token.bcrypt"

    @property
    def socket(self) -> Path:
        """The admin socket: in router/, or in a short 0700 dir under /tmp when that path is too long."""
        inside = self.dir / "admin.sock"
        if len(str(inside)) <= _SUN_PATH:
            return inside
        digest = hashlib.sha256(str(self.dir).encode()).hexdigest()[:12]
        return Path(f"/tmp/wtbox-router-{digest}/admin.sock")

    def make(self) -> None:
        for d in (self.dir, self.socket.parent, self.caddy_home):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            if d.stat().st_uid != os.geteuid():
                raise WtboxError(f"{d} belongs to another user; remove it so the router's files can live there.")
            os.chmod(d, 0o700)


def read_state(home: Path) -> dict[str, Any]:
    try:
        return json.loads(Paths(home).state.read_text())
    except (OSError, ValueError):
        return {}


def needs_revive(home: Path) -> bool:
    """True when a router was running for this home and its process is gone (killed, a reboot)."""
    state = read_state(home)
    return bool(state.get("pid")) and not procs.is_alive(state["pid"])
