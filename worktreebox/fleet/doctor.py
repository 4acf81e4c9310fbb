"""`wtbox doctor`: what is installed, what is missing, disk per box, and what leaked.

Each check is {"check", "ok", "detail"}. Resources add their own through
`Resource.checks(host)` (e.g. which mount method or cgroup version this host uses), so a
new resource kind reports here without an edit to this file.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worktreebox.fleet.gc import find_orphans, stray_mounts
from worktreebox.layers.store import STORES, LayerStore
from worktreebox.resources.ports import default_range, ephemeral_range, is_port_free

if TYPE_CHECKING:
    from worktreebox.host import Host


def report(host: Host, front_end_checks: Sequence[dict] = ()) -> dict[str, Any]:
    """Every check (the front end adds its own, e.g. the CLI server's), the disk use of each box
    and the orphans gc would remove."""
    checks = [*_check_binaries(host), _check_ports(host), _check_disk(host), *front_end_checks]
    d = host.docker_report()
    checks.append({"check": "docker", "ok": d["ok"], "detail": d["summary"]})
    for r in host.resources:
        checks += r.checks(host)
    mounts = next((c.get("mounts") for c in checks if c.get("check") == "mounts"), None)
    boxes = [{"id": b.id, "state": b.state, "bytes": host.disk_bytes(b)} for b in host.list()]
    return {"home": str(host.home), "checks": checks, "mounts": mounts, "boxes": boxes, "layers": _layers(host),
            "orphans": find_orphans(host), "stray_mounts": [m.target for m in stray_mounts(host)],
            "ok": all(c["ok"] for c in checks)}


def _layers(host) -> dict:
    """Pristine trees and dependency layers on disk (each shared by every box that uses it)."""
    out = {}
    for name in STORES:
        store = LayerStore(host.home / name)
        keys = store.keys()
        out[name] = {"count": len(keys), "bytes": sum(_dir_size(store.path(k)) for k in keys)}
    return out


def _check_binaries(host) -> list[dict]:
    checks = []
    git = shutil.which("git")
    checks.append({"check": "git", "ok": bool(git), "detail": git or "missing: apt-get install git"})
    checks += host.backend_checks()  # PostgreSQL, VictoriaMetrics
    vector = shutil.which("vector")
    checks.append({"check": "vector (optional)", "ok": True,
                   "detail": vector or "not installed; the built-in collector is used"})
    return checks


def _check_ports(host) -> dict:
    lo, hi = host.config.port_range or default_range()
    eph = ephemeral_range()
    leased = host.registry.leased_ports()
    sample = range(lo, min(hi, lo + 200) + 1)
    busy = sum(1 for p in sample if p not in leased and not is_port_free(p))
    ok = hi < eph[0] or lo > eph[1]
    return {"check": "port range", "ok": ok and busy < len(sample),
            "detail": f"{lo}-{hi} ({len(leased)} leased, {busy} of the first {len(sample)} busy elsewhere; "
                      f"kernel ephemeral range {eph[0]}-{eph[1]}{'' if ok else ' OVERLAPS'})"}


def _check_disk(host) -> dict:
    target = host.home if host.home.exists() else host.home.parent
    while not target.exists():
        target = target.parent
    usage = shutil.disk_usage(target)
    free_gb = usage.free / 1e9
    return {"check": "disk", "ok": free_gb > 2, "detail": f"{free_gb:.1f} GB free under {target}"}


def _dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


