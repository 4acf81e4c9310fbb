"""Host-wide port leases: one claim per port for every home and user on the machine.

Each home's registry records its own leases, but two homes (two users, or one user with two
`$WTBOX_HOME`s) cannot see each other's registries. So every lease is also claimed here, as
one small file per port in a directory all of them share:

    /var/lib/wtbox/leases/<port>    {"home": ..., "owner": <box id or @name>, "name": ..., "uid": ...}

A claim is `link(tmpfile, <port>)`: atomic, and it fails when the port is taken, so no lock
is needed to claim. The directory is world-writable with the sticky bit (like /tmp): anyone
may claim a free port, only the claimant (or root) may release it, and nobody can rewrite
another user's claim. When that directory cannot be made or used (not root, and nobody made
it), the claims go to a per-user directory instead, which is still exact for every home of
that user.

A claim whose home no longer exists is stale and taken over by whoever needs the port (under
a short lock in the directory, so two takers never both win); `gc` of a home also releases the
claims of its boxes that the registry no longer knows.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Iterator, Set
from pathlib import Path
from typing import Any

from worktreebox import settings
from worktreebox.settings import user_state_dir
from worktreebox.system import home_records as homes
from worktreebox.system.fsutil import file_lock

SHARED_DIR = Path("/var/lib/wtbox/leases")
# A claim not yet in its home's registry may be a `new` between claim and commit.
IN_FLIGHT_GRACE = 60.0


def _user_dir() -> Path:
    return Path(user_state_dir()) / "wtbox-leases"


def lease_dir() -> Path:
    """Where claims live: $WTBOX_LEASE_DIR, else the shared directory, else the per-user one."""
    override = settings.LEASE_DIR.value()
    if override:
        path = Path(override)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path
    if homes.usable_shared(SHARED_DIR):
        return SHARED_DIR
    path = _user_dir()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


class HostLeases:
    """The claims of one home in the host-wide lease directory."""

    def __init__(self, home: Path, directory: Path | None = None) -> None:
        self.home = os.path.realpath(home)
        self._dir = directory

    @property
    def dir(self) -> Path:
        if self._dir is None:
            self._dir = lease_dir()
        return self._dir

    # ------------------------------------------------------------ claiming
    def claim(self, port: int, owner: str, name: str) -> bool:
        """Claim `port` for `owner` of this home; False when someone else holds it (a stale
        claim of a home that is gone is taken over)."""
        record = {"home": self.home, "owner": owner, "name": name, "uid": os.geteuid(), "at": time.time()}
        tmp = self.dir / f".{port}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(record))
            os.chmod(tmp, 0o644)
            for _ in range(2):
                try:
                    os.link(tmp, self.dir / str(port))
                    return True
                except FileExistsError:
                    if not self._take_over_stale(port):
                        return False
            return False
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def release(self, port: int, owner: str | None) -> None:
        """Drop this home's claim on `port` if `owner` made it (None: whoever of this home did)."""
        rec = self.holder(port)
        if rec and rec.get("home") == self.home and owner in (None, rec.get("owner")):
            with contextlib.suppress(OSError):
                os.unlink(self.dir / str(port))

    def release_owner(self, owner: str, ports: Any = ()) -> None:
        """Drop every claim of `owner`: the ports given (the registry's: this home's claims on them
        go, whatever name they were made under, e.g. a pool box renamed when claimed) and any other
        claim it made here."""
        for port in set(ports):
            self.release(port, None)
        for port, rec in list(self._records()):
            if rec.get("home") == self.home and rec.get("owner") == owner:
                self.release(port, owner)

    # ------------------------------------------------------------ reading
    def holder(self, port: int) -> dict[str, Any] | None:
        """The claim on `port` ({} for a file being written or unreadable), or None when free."""
        try:
            fd = os.open(self.dir / str(port), os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        with os.fdopen(fd) as f:
            try:
                rec = json.loads(f.read() or "{}")
                rec["_uid"] = os.fstat(f.fileno()).st_uid  # the file's real owner, not what it says
                rec["_mtime"] = os.fstat(f.fileno()).st_mtime
                return rec if isinstance(rec, dict) else {}
            except (ValueError, OSError):
                return {}

    def _records(self) -> Iterator[tuple[int, dict[str, Any]]]:
        try:
            names = os.listdir(self.dir)
        except OSError:
            return
        for n in names:
            if n.isdigit():
                rec = self.holder(int(n))
                if rec is not None:
                    yield int(n), rec

    def owners(self) -> set[str]:
        """Owners (box ids, @names) this home holds claims for."""
        return {rec["owner"] for _, rec in self._records() if rec.get("home") == self.home and "owner" in rec}

    # ------------------------------------------------------------ stale claims
    def _take_over_stale(self, port: int) -> bool:
        """Remove the claim on `port` if its home is gone; True when the port may be tried again."""
        rec = self.holder(port)
        if rec is None:
            return True
        if not _home_gone(rec):
            return False
        with file_lock(self.dir / ".lock", mode=0o666, what="the host lease lock"):
            again = self.holder(port)
            if again is None:
                return True
            if again.get("home") != rec.get("home") or again.get("at") != rec.get("at"):
                return False  # someone took it over and claimed it meanwhile
            try:
                os.unlink(self.dir / str(port))
            except PermissionError:
                return False  # another user's claim: only they (or root) may remove it
            except FileNotFoundError:
                pass
            return True

    def sweep(self, known: set[str], known_ports: Set[int] = frozenset(), now: float | None = None) -> list[int]:
        """gc: release this home's claims that its registry no longer knows (neither the owner nor
        the port: a pool box renamed when claimed keeps its ports), past the in-flight grace,
        and any claim whose home is gone. Returns the ports released."""
        now = time.time() if now is None else now
        out = []
        for port, rec in list(self._records()):
            mine = rec.get("home") == self.home
            old = now - float(rec.get("_mtime") or 0) > IN_FLIGHT_GRACE
            unknown = rec.get("owner") not in known and port not in known_ports
            if (mine and unknown and old) or (rec and _home_gone(rec)):
                try:
                    os.unlink(self.dir / str(port))
                    out.append(port)
                except OSError:
                    pass
        now_tmp = time.time()
        with contextlib.suppress(OSError):
            for n in os.listdir(self.dir):
                p = self.dir / n
                if n.endswith(".tmp") and now_tmp - p.lstat().st_mtime > IN_FLIGHT_GRACE:
                    with contextlib.suppress(OSError):
                        p.unlink()
        return out


def _home_gone(rec: dict[str, Any]) -> bool:
    home = rec.get("home")
    return bool(home) and homes.gone(str(home))
