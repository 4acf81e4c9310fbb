"""The router's token: asked of every request when it listens beyond the loopback.

Made once per home (router/token, 0600, never printed unless asked); Caddy checks it as a
bearer header or as the basic-auth password of user `wtbox`, against the bcrypt hash that
`caddy hash-password` makes (the token reaches it on stdin, never on a command line).
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import secrets
import subprocess

from worktreebox.errors import WtboxError
from worktreebox.router.routes import Auth
from worktreebox.router.state import Paths
from worktreebox.system.fsutil import atomic_write


def loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def read(paths: Paths) -> str | None:
    try:
        return paths.token.read_text().strip() or None
    except OSError:
        return None


def auth(paths: Paths, binary: str) -> Auth:
    """The token (made now if missing) and its bcrypt hash (made when the token is new)."""
    paths.make()
    token = read(paths)
    if token is None:
        token = secrets.token_urlsafe(24)
        atomic_write(paths.token, token + "\n", mode=0o600)
    digest = hashlib.sha256(token.encode()).hexdigest()
    try:
        kept = json.loads(paths.token_hash.read_text())
    except (OSError, ValueError):
        kept = {}
    if kept.get("token_sha256") != digest:
        kept = {"token_sha256": digest, "bcrypt": _bcrypt(binary, token)}
        atomic_write(paths.token_hash, json.dumps(kept), mode=0o600)
    return Auth(token=token, bcrypt_b64=kept["bcrypt"])


def _bcrypt(binary: str, token: str) -> str:
    proc = subprocess.run([binary, "hash-password", "--algorithm", "bcrypt"], input=token + "\n",
                          capture_output=True, text=True, timeout=60)
    out = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not out:
        raise WtboxError(f"Caddy could not hash the router's token: {(proc.stderr or 'no output').strip()[:200]}.")
    return out[-1].strip()
