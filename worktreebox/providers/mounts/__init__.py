"""How a box gets its own writable view of a shared, read-only tree (the "mounts" kind of the
providers table in providers/__init__.py).

In order of preference: `overlay` (kernel overlayfs; root), `fuse-overlayfs` (unprivileged,
when installed), `reflink` (copy-on-write copies on btrfs/XFS), `checkout` (plain `git worktree
add`; dependency layers copied). The first that works on this host is chosen by mounting a
one-file tree under $WTBOX_HOME once; the result is kept in $WTBOX_HOME/mounts.json (probed
again when the kernel or user changes). `[host] mounts` in config.toml or WTBOX_MOUNTS forces one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from worktreebox.errors import ConfigError
from worktreebox.providers import PROVIDERS as _TABLE
from worktreebox.providers import choose as _choose
from worktreebox.providers.mounts.base import MountProvider, mounts_under, unmount

if TYPE_CHECKING:
    from worktreebox.context import HostContext

PROVIDERS = _TABLE["mounts"]
ORDER = tuple(PROVIDERS)
CACHE = "mounts.json"
PROBE_PREFIX = ".probe-"


@dataclasses.dataclass
class Choice:
    provider: MountProvider
    why: str  # one sentence for `wtbox doctor`
    probes: dict[str, str]  # provider name -> "works" or why not

    @property
    def name(self) -> str:
        return self.provider.name


_CHOSEN: dict[tuple[str, str | None], Choice] = {}


def for_host(host: HostContext) -> MountProvider:
    """The provider this host's boxes use (probed once per home, then read from mounts.json)."""
    key = (str(host.home), host.config.mounts)
    if key not in _CHOSEN:
        _CHOSEN[key] = choose(host.home, host.config.mounts, where=host.config.mounts_where)
    return _CHOSEN[key].provider


def get(name: str) -> MountProvider:
    return _choose("mounts", name)()


def choose(home: Path, forced: str | None = None, *, where: str = "[host] mounts", refresh: bool = False) -> Choice:
    """The provider boxes on this host use: `forced` if given (it must work), else the first that works."""
    if forced is not None and forced not in PROVIDERS:
        raise ConfigError(f"{where}: expected one of {', '.join(ORDER)}, got {forced!r}.")
    probes = {} if refresh else _cached(home)
    names = [forced] if forced else list(ORDER)
    for name in names:
        if name not in probes:
            probes[name] = _probe(home, get(name))
            _save(home, probes)
        if probes[name] == "works":
            if forced:
                why = f"forced by {where}"
            else:
                skipped = [f"{n}: {probes[n]}" for n in ORDER[:ORDER.index(name)]]
                why = "the first that works here" + (f" ({'; '.join(skipped)})" if skipped else "")
            return Choice(get(name), why, dict(probes))
        if forced:
            raise ConfigError(f"{where} = {forced!r}, but {forced} does not work on this host: {probes[name]}; "
                              f"use one of: {', '.join(n for n in ORDER if n != forced)}.")
    raise AssertionError("the checkout provider always works")  # pragma: no cover


def _fingerprint() -> dict[str, object]:
    return {"uid": os.geteuid(), "kernel": os.uname().release}


def _cached(home: Path) -> dict[str, str]:
    try:
        data = json.loads((home / CACHE).read_text())
    except (OSError, ValueError):
        return {}
    if data.get("host") != _fingerprint():
        return {}
    return {k: v for k, v in (data.get("probes") or {}).items() if k in PROVIDERS and isinstance(v, str)}


def _save(home: Path, probes: dict[str, str]) -> None:
    from worktreebox.system.fsutil import atomic_write

    home.mkdir(parents=True, exist_ok=True)
    atomic_write(home / CACHE, json.dumps({"host": _fingerprint(), "probes": probes}, indent=1) + "\n")


def _probe(home: Path, provider: MountProvider) -> str:
    """'works' or why not. The probe lives under the home (same file system as trees and boxes);
    a probe killed half-way leaves a .probe-* dir that gc unmounts and removes."""
    scratch = home / f"{PROBE_PREFIX}{os.getpid()}-{provider.name}-{secrets.token_hex(3)}"
    try:
        scratch.mkdir(parents=True)
        why = provider.probe(scratch)
    except OSError as e:
        why = str(e)
    finally:
        clean_probe(scratch)
    return "works" if why is None else why


def clean_probe(scratch: Path) -> None:
    for m in mounts_under(scratch, include_root=True):
        try:
            unmount(m)
        except Exception:
            pass
    shutil.rmtree(scratch, ignore_errors=True)


def stale_probes(home: Path) -> list[Path]:
    """Probe dirs whose process is gone (killed half-way); gc removes them."""
    from worktreebox.system.procs import pid_alive

    try:
        probes = [p for p in home.iterdir() if p.name.startswith(PROBE_PREFIX)]
    except FileNotFoundError:
        return []
    out = []
    for p in probes:
        pid = p.name[len(PROBE_PREFIX):].split("-", 1)[0]
        if not (pid.isdigit() and pid_alive(int(pid))):
            out.append(p)
    return out
