"""The cgroup resource: the box's control group, made before anything of the box runs.

create: `wtbox-<home key>-<box hex>/` in every hierarchy (see worktreebox/system/cgroups/) with the
limits of [box] cpu_weight / memory_max / pids_max over the host's [box] defaults. On a
host without cgroups it makes nothing and the box runs as before (`doctor` says why).
destroy: kill whatever is still inside (the services resource already stopped the
supervisor gracefully and killed the cgroup before its own sweep), then remove it.
discover: box ids that have a cgroup under this home (by the hex their cgroup is named after).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from worktreebox.resources.base import Creation, Resource, ids_by_hex, warn
from worktreebox.system import cgroups, procs
from worktreebox.system import home_records as homes

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.config.load import LimitsConfig
    from worktreebox.context import HostContext


# A box made ahead for the warm pool is made (and waits) at this CPU weight, a tenth of a box in
# use, so that filling the pool never slows the boxes people work in; claiming it restores its own.
POOL_CPU_WEIGHT = 10


class Cgroup(Resource):
    name = "cgroup"
    parallel = False  # everything after it (VictoriaMetrics, setup, services) starts inside it

    def create(self, c: Creation) -> None:
        backend = cgroups.for_home(c.host.home)
        if backend is None:
            return
        limits = effective_limits(c.config.box.limits, c.host.config.box_limits)
        pooled = c.box.pool is not None
        # so that gc elsewhere can sweep it if the home is deleted
        homes.note(cgroups.home_key(c.host.home), c.host.home)
        backend.create(c.box.id, dataclasses.replace(limits, cpu_weight=POOL_CPU_WEIGHT) if pooled else limits)
        c.box.data[self.name] = {"version": backend.version, "path": backend.relative(c.box.id),
                                 **{k: v for k, v in dataclasses.asdict(limits).items() if v is not None}}
        if pooled:
            c.box.data[self.name]["pooled_cpu_weight"] = POOL_CPU_WEIGHT
        unenforced = [key for key, controller in (("cpu_weight", "cpu"), ("memory_max", "memory"),
                                                  ("pids_max", "pids"))
                      if getattr(limits, key) is not None and controller in backend.missing]
        if unenforced:
            warn(f"{', '.join(unenforced)} cannot be enforced here: this host's cgroups lack the "
                 f"{', '.join(c for c in ('cpu', 'memory', 'pids') if c in backend.missing)} controller")

    def destroy(self, host: HostContext, box: Box) -> None:
        backend = cgroups.for_home(host.home)
        if backend is not None and backend.exists(box.id):
            procs.remove_box_cgroup(host.home, box.id)

    def failure_cause(self, host: HostContext, box: Box) -> str | None:
        """A box whose pids_max refused a process fails in whatever tried to start one (VictoriaMetrics
        exits 2, a shell says 'fork: retry'): name the limit."""
        backend = cgroups.for_home(host.home)
        limit = (box.data.get(self.name) or {}).get("pids_max")
        if backend is None or not limit or not backend.exists(box.id) or not backend.pids_refused(box.id):
            return None
        return (f"the box reached its pids_max ({limit} processes and threads, wtbox's own supervisor and "
                f"metrics store included); raise [box] pids_max")

    def discover(self, host: HostContext) -> set[str]:
        """Ids of boxes with a cgroup (named by the id's hex): the registry's, else the box dir's
        (`new` makes the dir before the cgroup), else `wt_<hex>` as the database names such a box."""
        backend = cgroups.for_home(host.home)
        if backend is None:
            return set()
        return ids_by_hex(host, set(backend.box_keys()), "wt_")

    def status(self, host: HostContext, box: Box) -> dict[str, Any] | None:
        data = box.data.get(self.name)
        backend = cgroups.for_home(host.home)
        if not data or backend is None:
            return None
        usage = backend.usage(box.id)
        return {"cgroup": {**data, "usage": dataclasses.asdict(usage) if usage else None}}


    def checks(self, host: HostContext) -> list[dict[str, Any]]:
        """Informational: without cgroups boxes work as before, only without limits and exact teardown."""
        backend = cgroups.for_home(host.home)
        if backend is None:
            return [{"check": "cgroups", "ok": True, "cgroups": None,
                     "detail": f"unavailable, {cgroups.unavailable(host.home)}: boxes run without cpu_weight, "
                               "memory_max and pids_max, and teardown finds their processes by WTBOX_ID and cwd only"}]
        where = ", ".join(str(b / f"{backend.prefix}<box>") for b in backend.bases[:2]) + \
            (", ..." if len(backend.bases) > 2 else "")
        missing = f"; no {', '.join(backend.missing)} controller (those limits are not enforced)" \
            if backend.missing else ""
        return [{"check": "cgroups", "ok": True, "cgroups": backend.version,
                 "detail": f"{backend.version}: one per box under {where}{missing}"}]


def claimed(host: HostContext, box: Box) -> None:
    """A pool box became a user's box: from the pool's low CPU weight to its own (pool.claim)."""
    data = box.data.get("cgroup") or {}
    backend = cgroups.for_home(host.home)
    if backend is None or data.pop("pooled_cpu_weight", None) is None:
        return
    # The kernel refuses a weight for an idle (background) group: lift the flag around the write.
    background = backend.background(box.id)
    if background:
        backend.set_background(box.id, False)
    try:
        backend.set_limits(box.id, cgroups.Limits(cpu_weight=data.get("cpu_weight") or cgroups.DEFAULT_CPU_WEIGHT))
    finally:
        if background:
            backend.set_background(box.id, True)


def effective_limits(repo: LimitsConfig, host: LimitsConfig) -> cgroups.Limits:
    """The repo's [box] limits over the host's defaults; "max" (0) and unset mean no limit."""
    merged = repo.over(host)
    return cgroups.Limits(cpu_weight=merged.cpu_weight or None, memory_max=merged.memory_max or None,
                          pids_max=merged.pids_max or None)
