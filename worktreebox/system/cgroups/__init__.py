"""Per-box control groups: fair CPU, memory and pid limits, exact membership, accounting.

Every box gets a cgroup `<base>/wtbox-<home key>-<box hex>/` (the 8 random hex digits of
its id: a box claimed from the warm pool keeps them, `pool-<hex>` becoming `<task>-<hex>`,
while its running supervisor still calls it by the old id), and every process wtbox
starts for it lives in one *leaf* below that: the service's own name, or one of the `_`
names (service names cannot start with `_`, so they never clash). Processes sit only
in leaves because cgroup v2 forbids processes in a cgroup whose children use controllers.

- cgroup v2 (one unified tree, v2.py): base `/sys/fs/cgroup` as root, or otherwise the
  delegated subtree (the highest cgroup above us that we own).
- cgroup v1 (one tree per controller, v1.py): the root of each mounted cpu, cpuacct, memory,
  pids, freezer and blkio hierarchy (co-mounted ones count once).
Both implement base.Cgroups; detect.py picks one per home; oom.py names the OOM kills.

Why each box sits directly in the base, not in a shared `wtbox/` parent: the CPU
scheduler is hierarchical, so a parent would make all boxes one entity among the host's
other sessions; a box that burns CPU uses up that entity's share and every other box
waits behind it. Measured on a busy 2-core host, a box's probe p95 with a neighbour
burning 5 processes rose 4x under a shared parent, 1.2-1.4x with boxes as siblings.

The home key (a hash of $WTBOX_HOME) keeps homes that share a host apart: gc in one
home lists and removes only its own boxes' cgroups.

This package knows cgroups only (what it reads of the kernel comes through procfs, and the
kernel log); `procs` decides when to place, stop and sweep. Callers use the names below.
"""
from __future__ import annotations

from worktreebox.system.cgroups.base import (
    BROWSER,
    CGROUP_FS,
    DEFAULT_CPU_WEIGHT,
    EXEC,
    METRICS,
    MIGRATE,
    RUN,
    SETUP,
    SUPERVISOR,
    TRACES,
    Cgroups,
    Leaf,
    Limits,
    Usage,
    home_key,
    key_of,
)
from worktreebox.system.cgroups.detect import detect, for_home, place, placement, unavailable
from worktreebox.system.cgroups.oom import OomWatch, oom_victims
from worktreebox.system.cgroups.v1 import CgroupsV1
from worktreebox.system.cgroups.v2 import CgroupsV2

__all__ = [
    "BROWSER", "CGROUP_FS", "DEFAULT_CPU_WEIGHT", "EXEC", "METRICS", "MIGRATE", "RUN", "SETUP", "SUPERVISOR", "TRACES",
    "Cgroups", "CgroupsV1", "CgroupsV2", "Leaf", "Limits", "OomWatch", "Usage", "detect", "for_home", "home_key",
    "key_of", "oom_victims", "place", "placement", "unavailable",
]
