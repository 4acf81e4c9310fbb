"""Who may reach `wtbox mcp --http`: a loopback address only, and a bearer token kept in the home.

Kept apart from the server (and from the SDK's import cost) so that a refused address or an
unreadable token file is one sentence before anything else starts.
"""
from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from worktreebox.errors import UsageError, WtboxError

TOKEN_FILE = "mcp-token"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def parse_bind(text: str) -> tuple[str, int]:
    """'127.0.0.1:PORT' (or localhost:PORT, [::1]:PORT) -> (host, port); anything else is refused."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--http {text!r}: expected 127.0.0.1:PORT.")
    if host not in LOOPBACK:
        raise UsageError(f"--http {text!r}: the MCP server binds to loopback only (127.0.0.1, localhost "
                         "or [::1]), never to an address other hosts can reach.")
    return ("127.0.0.1" if host == "localhost" else host), int(port)


def token_path(home: str | Path) -> Path:
    return Path(home) / TOKEN_FILE


def ensure_token(home: str | Path) -> tuple[str, bool]:
    """The bearer token ($WTBOX_HOME/mcp-token, made once with mode 0600): (token, made now).

    The file appears whole through a hard link that fails if it exists, so two servers starting
    at once agree on one token; a file that other users can read is refused rather than trusted.
    """
    path = token_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        os.link(tmp, path)  # appears whole, and only if no other server made one first
        return token, True
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise WtboxError(f"{path} can be read by other users; delete it and start again for a new token.")
    existing = path.read_text().strip()
    if not existing:
        raise WtboxError(f"{path} is empty; delete it and start again for a new token.")
    return existing, False


class StaticToken:
    """The SDK's TokenVerifier for our one token, compared in constant time."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def verify_token(self, token: str) -> Any:
        from mcp.server.auth.provider import AccessToken

        if hmac.compare_digest(token.encode(), self._token):
            return AccessToken(token="wtbox", client_id="wtbox", scopes=[])
        return None
