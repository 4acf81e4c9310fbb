"""A directory of immutable entries, each built once per key: trees/<commit>, deps/<sha256>.

- Single flight: one builder per key on this host (an flock per key); everyone else waits
  for it and then uses what it built. A build goes into `.tmp-<key>-<rand>/` and is renamed
  into place whole, so an entry that exists is complete.
- In use: whoever is about to mount an entry holds the key's lock shared until it is mounted,
  so gc (which needs it exclusive) never deletes an entry under someone who just found it.
  Once mounted, the entry is protected by the box that records it (see `sweep`).
- Crash safety: a builder killed half-way leaves its temp dir and no lock (flock dies with
  the process); `sweep` removes temp dirs whose key is not locked.
- Age: the key's lock file is touched on every use; `sweep` removes entries unused for longer
  than a time-to-live that no box uses.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worktreebox.box import Box

TMP, TRASH, LOCKS = ".tmp-", ".trash-", ".locks"
USES = "layers"  # boxes/<id>/layers: one "<store> <key>" line per shared entry the box uses
STORES = ("trees", "deps")  # $WTBOX_HOME/<store>/<key>


class LayerStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key

    def _lock_path(self, key: str) -> Path:
        return self.root / LOCKS / f"{key}.lock"

    def _open_lock(self, key: str) -> int:
        lock = self._lock_path(key)
        try:
            return os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:
            lock.parent.mkdir(parents=True, exist_ok=True)
            return os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)

    @contextlib.contextmanager
    def use(self, key: str, build: Callable[[Path], None], *, on_wait: Callable[[], None] | None = None
            ) -> Iterator[tuple[Path, bool]]:
        """(entry path, built by us) for `key`, built by `build(tmp_dir)` first if missing; held
        against deletion while the block runs. A failed build leaves nothing and raises."""
        fd = self._open_lock(key)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            entry, built = self.path(key), False
            while not entry.is_dir():
                # Converting a shared flock to exclusive releases it first, so two waiters never
                # deadlock; whoever gets it first builds, the others find the entry done.
                if on_wait is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        on_wait()
                        fcntl.flock(fd, fcntl.LOCK_EX)
                else:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                if not entry.is_dir():
                    self._build(key, build)
                    built = True
                fcntl.flock(fd, fcntl.LOCK_SH)
            os.utime(fd)  # last use: what sweep's time-to-live counts from
            yield entry, built
        finally:
            os.close(fd)

    def _build(self, key: str, build: Callable[[Path], None]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{TMP}{key}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            build(tmp)
            os.rename(tmp, self.path(key))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def keys(self) -> list[str]:
        try:
            return sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".") and p.is_dir())
        except FileNotFoundError:
            return []

    def last_used(self, key: str) -> float:
        try:
            return self._lock_path(key).stat().st_mtime
        except FileNotFoundError:
            try:
                return self.path(key).stat().st_mtime
            except FileNotFoundError:
                return 0.0

    def sweep(self, in_use: set[str], ttl: float, now: float | None = None) -> list[str]:
        """Delete half-built temp dirs of dead builders, and entries no box uses that were last
        used more than `ttl` seconds ago. Returns what was removed (paths relative to the store)."""
        now = time.time() if now is None else now
        removed = []
        try:
            names = [p.name for p in self.root.iterdir()]
        except FileNotFoundError:
            return []
        for name in names:
            if name.startswith(TMP):
                key = name[len(TMP):].rsplit("-", 1)[0]
                with self._try_exclusive(key) as free:
                    if free and (self.root / name).exists():  # its builder is gone
                        _stop_builds_in(self.root / name)
                        shutil.rmtree(self.root / name, ignore_errors=True)
                        if (self.root / name).exists():  # a straggler wrote into it meanwhile
                            _stop_builds_in(self.root / name)
                            shutil.rmtree(self.root / name, ignore_errors=True)
                        removed.append(name)
            elif name.startswith(TRASH):
                shutil.rmtree(self.root / name, ignore_errors=True)
                removed.append(name)
            elif not name.startswith(".") and name not in in_use and now - self.last_used(name) > ttl:
                with self._try_exclusive(name) as free:
                    if not free or now - self.last_used(name) <= ttl:
                        continue  # being built, or someone is about to mount it
                    trash = self.root / f"{TRASH}{name}-{secrets.token_hex(3)}"
                    os.rename(self.root / name, trash)  # gone at once for everyone; deleted after
                    shutil.rmtree(trash, ignore_errors=True)
                    removed.append(name)
        return removed

    @contextlib.contextmanager
    def _try_exclusive(self, key: str) -> Iterator[bool]:
        """Yields True holding the key's lock exclusively, False if someone holds it (no waiting)."""
        fd = self._open_lock(key)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)


def _stop_builds_in(tmp: Path) -> None:
    """What a killed builder started keeps running: a build command (uv sync, npm ci, checkout-index)
    in its own session with its cwd in the temp dir, a `tar -C <temp dir>` of the export. End them
    before deleting the dir under them, or they write into it while it is deleted."""
    from worktreebox.system import procs

    strays = procs.find_box_processes("-", tmp)  # "-": no box id; matched by cwd alone
    if strays:
        procs.stop_processes(strays)
    procs.kill_mentioning(str(tmp))


# ---------------------------------------------------------------- which boxes use what

def record_use(box: Box, store: str, key: str) -> None:
    """Note in the box's dir, before it uses the entry, that it does: gc keeps what a box lists."""
    box.dir.mkdir(parents=True, exist_ok=True)
    with open(box.dir / USES, "a") as f:
        f.write(f"{store} {key}\n")


def uses(boxes_dir: Path) -> dict[str, set[str]]:
    """store name -> keys some box (alive, being made, or not yet collected) uses."""
    out: dict[str, set[str]] = {}
    try:
        dirs = list(Path(boxes_dir).iterdir())
    except FileNotFoundError:
        return out
    for d in dirs:
        try:
            text = (d / USES).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            store, _, key = line.partition(" ")
            if key:
                out.setdefault(store, set()).add(key)
    return out


def in_use(home: Path, boxes_dir: Path, table: list | None = None) -> dict[str, set[str]]:
    """Keys each store must keep: listed by a box dir, or the lower layer of a mount right now."""
    from worktreebox.providers.mounts.base import mount_table

    used = uses(boxes_dir)
    roots = {name: str(Path(home) / name) + "/" for name in STORES}
    for m in mount_table() if table is None else table:
        for opt in m.options.split(","):
            if not opt.startswith("lowerdir="):
                continue
            for lower in opt[len("lowerdir="):].split(":"):
                for name, root in roots.items():
                    if lower.startswith(root):
                        used.setdefault(name, set()).add(lower[len(root):].split("/", 1)[0])
    return used


def sweep_all(home: Path, boxes_dir: Path, ttl: float) -> list[str]:
    """gc of every store: half-built entries of dead builders, and entries unused for `ttl`."""
    used = in_use(home, boxes_dir)
    removed = []
    for name in STORES:
        removed += [f"{name}/{k}" for k in LayerStore(Path(home) / name).sweep(used.get(name, set()), ttl)]
    return removed
