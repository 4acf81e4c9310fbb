"""Per-box control groups: fair CPU, memory and pid limits, exact membership, accounting.

Every box gets a cgroup `<base>/wtbox-<home key>-<box hex>/` (the 8 random hex digits of
its id: a box claimed from the warm pool keeps them, `pool-<hex>` becoming `<task>-<hex>`,
while its running supervisor still calls it by the old id), and every process wtbox
starts for it lives in one *leaf* below that: the service's own name, or one of the `_`
names below (service names cannot start with `_`, so they never clash). Processes sit only
in leaves because cgroup v2 forbids processes in a cgroup whose children use controllers.

- cgroup v2 (one unified tree): base `/sys/fs/cgroup` as root, or otherwise the
  delegated subtree (the highest cgroup above us that we own).
- cgroup v1 (one tree per controller): the root of each mounted cpu, cpuacct, memory,
  pids, freezer and blkio hierarchy (co-mounted ones count once).

Why each box sits directly in the base, not in a shared `wtbox/` parent: the CPU
scheduler is hierarchical, so a parent would make all boxes one entity among the host's
other sessions; a box that burns CPU uses up that entity's share and every other box
waits behind it. Measured on a busy 2-core host, a box's probe p95 with a neighbour
burning 5 processes rose 4x under a shared parent, 1.2-1.4x with boxes as siblings.

The home key (a hash of $WTBOX_HOME) keeps homes that share a host apart: gc in one
home lists and removes only its own boxes' cgroups.

This module knows cgroups only (it reads the mount table, /proc/self/cgroup and the
kernel log for that alone); `procs` decides when to place, stop and sweep.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

from worktreebox import settings

SUPERVISOR, METRICS, TRACES, EXEC, SETUP, MIGRATE, RUN, BROWSER = (
    "_supervisor", "_metrics", "_traces", "_exec", "_setup", "_migrate", "_run", "_browser")
CGROUP_FS = Path("/sys/fs/cgroup")
DEFAULT_CPU_WEIGHT = 100  # cgroup v2's default; v1 cpu.shares 1024 is the same share
KILL_TIMEOUT = 5.0


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a box may use. None = no limit (cpu: the default, equal weight)."""

    cpu_weight: int | None = None  # 1..10000, cgroup v2 units (100 = the default share)
    memory_max: int | None = None  # bytes
    pids_max: int | None = None


@dataclasses.dataclass
class Usage:
    """A box's consumption, read from its cgroup (None: the host cannot tell)."""

    cpu_seconds: float
    memory_bytes: int | None  # resident use, page cache that could be dropped not counted
    memory_peak_bytes: int | None
    pids: int | None
    io_read_bytes: int | None = None
    io_write_bytes: int | None = None


class Leaf(NamedTuple):
    """Where a process goes: one leaf of one box of one home."""

    home: Path | str
    box_id: str
    name: str


def placement(leaf: Leaf) -> Callable[[], None] | None:
    """The preexec hook that puts a new child into `leaf` (see Cgroups.placer); None when the
    host has no cgroups or the box has none (made before cgroups, or being removed)."""
    backend = for_home(leaf.home)
    return backend.placer(leaf.box_id, leaf.name) if backend is not None else None


_HEX = re.compile(r"[0-9a-f]{8}$")
_BOX_DIR = re.compile(r"wtbox-([0-9a-f]{8})-(.+)")


def key_of(box_id: str) -> str:
    """What names a box's cgroup: the 8 hex digits its id ends with (the id itself otherwise)."""
    m = _HEX.search(box_id)
    return m.group(0) if m else box_id


def home_key(home: Path | str) -> str:
    """8 hex digits naming one $WTBOX_HOME in cgroup paths."""
    return hashlib.sha256(os.path.realpath(home).encode()).hexdigest()[:8]


# ---------------------------------------------------------------- the two backends

class Cgroups:
    """One home's box cgroups. `bases` holds one directory per hierarchy (one on v2): the
    same relative path `wtbox-<home key>-<box hex>/<leaf>` is made below each. Methods take a
    box id (or its hex)."""

    version = "?"

    def __init__(self, bases: list[Path], mounts: list[Path], outside: list[Path], key: str) -> None:
        self.bases = bases
        self.mount_points = mounts  # per base: the hierarchy's mount point
        self.outside = outside  # per base: where a process we must spare is moved before a kill
        self.prefix = f"wtbox-{key}-"
        self.missing: list[str] = []  # controllers absent here, for doctor

    def __repr__(self) -> str:
        return f"{type(self).__name__}({[str(b / self.prefix) for b in self.bases]}...)"

    # -- layout
    def box_dirs(self, box_id: str, leaf: str | None = None) -> list[Path]:
        name = self.prefix + key_of(box_id)
        return [b / name / leaf if leaf else b / name for b in self.bases]

    def exists(self, box_id: str) -> bool:
        return any(d.is_dir() for d in self.box_dirs(box_id))

    def box_keys(self) -> set[str]:
        """The hex of every box of this home with a cgroup in any hierarchy (a crash can leave some)."""
        out = set()
        for b in self.bases:
            try:
                out.update(e.name[len(self.prefix):] for e in os.scandir(b)
                           if e.name.startswith(self.prefix) and e.is_dir())
            except FileNotFoundError:
                continue
        return out

    def other_homes(self) -> dict[str, set[str]]:
        """Home key → box hex of every other home's box cgroup in our hierarchies."""
        out: dict[str, set[str]] = {}
        for b in self.bases:
            try:
                names = [e.name for e in os.scandir(b) if e.is_dir()]
            except FileNotFoundError:
                continue
            for name in names:
                m = _BOX_DIR.fullmatch(name)
                if m and not name.startswith(self.prefix):
                    out.setdefault(m.group(1), set()).add(m.group(2))
        return out

    def of_home(self, key: str) -> Cgroups:
        """The same hierarchies, seen as the home with this key (gc of a home that is gone)."""
        other = copy.copy(self)
        other.prefix = f"wtbox-{key}-"
        return other

    def leaves(self, box_id: str) -> list[str]:
        names: set[str] = set()
        for d in self.box_dirs(box_id):
            try:
                names.update(e.name for e in os.scandir(d) if e.is_dir())
            except FileNotFoundError:
                continue
        return sorted(names)

    # -- making
    def create(self, box_id: str, limits: Limits) -> None:
        """Make the box's cgroup (idempotent) and apply its limits."""
        for b, d in zip(self.bases, self.box_dirs(box_id)):
            self._prepare_base(b)
            d.mkdir(exist_ok=True)
        self._prepare_box(box_id)
        self.set_limits(box_id, limits)

    def _prepare_base(self, base: Path) -> None:
        pass

    def _prepare_box(self, box_id: str) -> None:
        pass

    def set_limits(self, box_id: str, limits: Limits) -> None:
        raise NotImplementedError

    def create_leaf(self, box_id: str, leaf: str) -> list[Path] | None:
        """Make one leaf of an existing box; its cgroup.procs files, or None when the box has no cgroup.

        Never makes the box itself: a late spawn must not bring back a cgroup that rm removed.
        """
        dirs = self.box_dirs(box_id)
        if not any(d.is_dir() for d in dirs):
            return None
        out = []
        for d in dirs:
            (d / leaf).mkdir(exist_ok=True)  # FileNotFoundError: the box is being removed
            out.append(d / leaf / "cgroup.procs")
        return out

    def placer(self, box_id: str, leaf: str) -> Callable[[], None] | None:
        """A preexec_fn that moves the new child into the leaf before it execs anything.

        It runs between fork and exec, so it only calls os.open/os.write/os.close on bytes
        prepared here: no import, no lock that another thread of the parent (the supervisor
        has several) could have held at the fork. None when the box has no cgroup.
        """
        files = self.create_leaf(box_id, leaf)
        if not files:
            return None
        paths = [os.fsencode(f) for f in files]

        def enter_cgroup() -> None:
            for p in paths:
                fd = os.open(p, os.O_WRONLY)
                try:
                    os.write(fd, b"0")  # 0 = the writing process itself
                finally:
                    os.close(fd)

        return enter_cgroup

    def place(self, pid: int, box_id: str, leaf: str) -> bool:
        """Move a running process (e.g. ourselves before exec) into the leaf; False without a cgroup."""
        files = self.create_leaf(box_id, leaf)
        if not files:
            return False
        for f in files:
            f.write_text(str(pid))
        return True

    # -- membership
    def pids(self, box_id: str, leaf: str | None = None) -> set[int]:
        """Live processes in the box's cgroup (or one leaf), in any hierarchy."""
        out: set[int] = set()
        for d in self.box_dirs(box_id, leaf):
            out |= _members(d)
        return out

    # -- ending
    def kill(self, box_id: str, leaf: str | None = None, *, spare: Iterable[int] = (),
             timeout: float = KILL_TIMEOUT) -> set[int]:
        """SIGKILL every process in the box's cgroup (or one leaf) and wait until it is empty.

        `spare` (the caller and its ancestors, e.g. `wtbox rm` run from `wtbox shell`) are
        moved out first. Returns the pids that were killed.
        """
        dirs = [d for d in self.box_dirs(box_id, leaf) if d.is_dir()]
        if not dirs:
            return set()
        spare = set(spare)
        stuck = self._evict(dirs, spare)  # spared processes that could not leave: signal one by one
        killed = self.pids(box_id, leaf) - spare
        if not killed:
            return killed
        if stuck or not self._kill_at_once(box_id, leaf):
            # Freeze first so that nothing forks away between listing and signalling, then thaw
            # so that the signals are delivered. Never freeze a cgroup we could not empty of ourselves.
            frozen = not stuck and self._freeze(box_id, leaf, True)
            try:
                killed = self.pids(box_id, leaf) - spare
                for pid in killed:
                    _sigkill(pid)
            finally:
                if frozen:
                    self._freeze(box_id, leaf, False)
        deadline = time.monotonic() + timeout
        while True:
            left = self.pids(box_id, leaf) - spare
            if not left:
                return killed
            if time.monotonic() > deadline:
                raise OSError(f"{len(left)} processes in the cgroup of {box_id} survived SIGKILL "
                              f"(pids {', '.join(map(str, sorted(left)[:5]))})")
            for pid in left - killed:  # forked before the kill reached them (no freezer here)
                _sigkill(pid)
            killed |= left
            time.sleep(0.005)

    def _kill_at_once(self, box_id: str, leaf: str | None) -> bool:
        """Kill the whole subtree in one kernel operation, if this backend can."""
        return False

    def _freeze(self, box_id: str, leaf: str | None, on: bool) -> bool:
        return False

    def _evict(self, dirs: list[Path], spare: set[int]) -> set[int]:
        """Move spared processes out of the dirs; those that could not be moved."""
        inside = set()
        for d in dirs:
            inside |= _members(d) & spare
        stuck = set()
        for pid in inside:
            for target in self.outside:
                try:
                    (target / "cgroup.procs").write_text(str(pid))
                except OSError:
                    stuck.add(pid)
        return stuck

    def remove(self, box_id: str, *, spare: Iterable[int] = ()) -> None:
        """Kill what is left and delete the box's cgroup, leaves first. Idempotent."""
        self.kill(box_id, spare=spare)
        for d in self.box_dirs(box_id):
            _rmtree_cgroup(d)

    def remove_leaf(self, box_id: str, leaf: str) -> None:
        for d in self.box_dirs(box_id, leaf):
            _rmtree_cgroup(d)

    # -- accounting
    def cpu_dir(self, box_id: str) -> Path | None:
        """The box's directory in the hierarchy that has the cpu controller."""
        return self.box_dirs(box_id)[0]

    def cpu_pids(self, box_id: str) -> set[int]:
        """Live processes of the box from the cpu hierarchy alone (every process of a box is in
        each hierarchy: one walk instead of one per hierarchy, for a caller that looks often)."""
        d = self.cpu_dir(box_id)
        return _members(d) if d is not None else set()

    def set_background(self, box_id: str, on: bool) -> bool:
        """`cpu.idle` of the box (Linux >= 5.15): a background box gets what the others leave and
        never delays their wake-ups (background.py says when). False when the kernel has no such file."""
        d = self.cpu_dir(box_id)
        try:
            return d is not None and _write_if(d / "cpu.idle", 1 if on else 0)
        except OSError:
            return False

    def background(self, box_id: str) -> bool:
        d = self.cpu_dir(box_id)
        return d is not None and _read(d / "cpu.idle").strip() == "1"

    def usage(self, box_id: str) -> Usage | None:
        raise NotImplementedError

    def oom_kills(self, box_id: str) -> dict[str, int]:
        """Per leaf: processes the kernel's OOM killer ended there (cumulative while the leaf exists)."""
        raise NotImplementedError

    def limits(self, box_id: str) -> Limits:
        """The limits in force, read back from the cgroup."""
        raise NotImplementedError

    def relative(self, box_id: str, leaf: str | None = None) -> str:
        """The cgroup path as /proc/<pid>/cgroup shows it (first hierarchy)."""
        return "/" + str(self.box_dirs(box_id, leaf)[0].relative_to(self.mount_points[0]))


class CgroupsV2(Cgroups):
    version = "v2"
    CONTROLLERS = ("cpu", "memory", "pids", "io")

    def __init__(self, base: Path, key: str, outside: Path, mount: Path = CGROUP_FS) -> None:
        super().__init__([base], [mount], [outside], key)
        self.enabled: set[str] = set()
        self.missing = [c for c in self.CONTROLLERS if c not in _read(base / "cgroup.controllers").split()]

    def _prepare_base(self, base: Path) -> None:
        # Each level passes the controllers down (subtree_control) before its children can use them.
        self.enabled = self._enable(base, set(self.CONTROLLERS))
        self.missing = [c for c in self.CONTROLLERS if c not in self.enabled]

    def _prepare_box(self, box_id: str) -> None:
        self._enable(self.box_dirs(box_id)[0], self.enabled)

    @staticmethod
    def _enable(d: Path, wanted: set[str]) -> set[str]:
        """Turn on in d's subtree_control what d has; the controllers d's children get."""
        have = set(_read(d / "cgroup.controllers").split())
        on = set(_read(d / "cgroup.subtree_control").split())
        for c in sorted((wanted & have) - on):
            try:
                (d / "cgroup.subtree_control").write_text(f"+{c}")
                on.add(c)
            except OSError:  # processes in d (no-internal-process rule), or not delegated
                pass
        return on & wanted

    def set_limits(self, box_id: str, limits: Limits) -> None:
        d = self.box_dirs(box_id)[0]
        if limits.cpu_weight is not None:
            _write_if(d / "cpu.weight", limits.cpu_weight)
        if limits.memory_max is not None:
            _write_if(d / "memory.max", limits.memory_max)
            _write_if(d / "memory.swap.max", 0)  # a box at its limit is killed, not swapped to death
        if limits.pids_max is not None:
            _write_if(d / "pids.max", limits.pids_max)

    def limits(self, box_id: str) -> Limits:
        d = self.box_dirs(box_id)[0]
        return Limits(cpu_weight=_int(_read(d / "cpu.weight")), memory_max=_int(_read(d / "memory.max")),
                      pids_max=_int(_read(d / "pids.max")))

    def _kill_at_once(self, box_id: str, leaf: str | None) -> bool:
        try:
            (self.box_dirs(box_id, leaf)[0] / "cgroup.kill").write_text("1")  # kills the whole subtree, forks included (5.14+)
            return True
        except OSError:
            return False

    def _freeze(self, box_id: str, leaf: str | None, on: bool) -> bool:
        d = self.box_dirs(box_id, leaf)[0]
        try:
            (d / "cgroup.freeze").write_text("1" if on else "0")
        except OSError:
            return False
        if on:
            _wait(lambda: "frozen 1" in _read(d / "cgroup.events"), 1.0)
        return True

    def usage(self, box_id: str) -> Usage | None:
        d = self.box_dirs(box_id)[0]
        if not d.is_dir():
            return None
        cpu = _keyed(_read(d / "cpu.stat")).get("usage_usec", 0) / 1e6
        current = _int(_read(d / "memory.current"))
        if current is not None:
            current = max(0, current - _keyed(_read(d / "memory.stat")).get("inactive_file", 0))
        rd = wr = None
        io = _read(d / "io.stat")
        if io or (d / "io.stat").exists():
            rd = wr = 0
            for line in io.splitlines():
                for field in line.split()[1:]:
                    k, _, v = field.partition("=")
                    if k == "rbytes":
                        rd += int(v)
                    elif k == "wbytes":
                        wr += int(v)
        return Usage(cpu_seconds=cpu, memory_bytes=current, memory_peak_bytes=_int(_read(d / "memory.peak")),
                     pids=_int(_read(d / "pids.current")) if (d / "pids.current").exists() else len(self.pids(box_id)),
                     io_read_bytes=rd, io_write_bytes=wr)

    def oom_kills(self, box_id: str) -> dict[str, int]:
        out = {}
        for leaf in self.leaves(box_id):
            events = _keyed(_read(self.box_dirs(box_id, leaf)[0] / "memory.events"))
            if "oom_kill" in events:
                out[leaf] = events["oom_kill"]
        return out


class CgroupsV1(Cgroups):
    version = "v1"

    def __init__(self, mounts: dict[str, Path], key: str) -> None:
        # mounts: controller → mount point; co-mounted controllers share one (e.g. cpu,cpuacct).
        unique = list(dict.fromkeys(mounts.values()))
        super().__init__(unique, unique, unique, key)
        self._base_of = dict(mounts)
        self.missing = [c for c in ("cpu", "cpuacct", "memory", "pids", "freezer") if c not in mounts]

    def _dir(self, controller: str, box_id: str, leaf: str | None = None) -> Path | None:
        base = self._base_of.get(controller)
        if base is None:
            return None
        d = base / (self.prefix + key_of(box_id))
        return d / leaf if leaf else d

    def cpu_dir(self, box_id: str) -> Path | None:
        return self._dir("cpu", box_id)

    def set_limits(self, box_id: str, limits: Limits) -> None:
        cpu = self._dir("cpu", box_id)
        if cpu and limits.cpu_weight is not None:
            _write_if(cpu / "cpu.shares", max(2, round(limits.cpu_weight * 1024 / DEFAULT_CPU_WEIGHT)))
        mem = self._dir("memory", box_id)
        if mem and limits.memory_max is not None:
            _write_if(mem / "memory.limit_in_bytes", limits.memory_max)
            # memory+swap no higher than memory: a box at its limit is killed, not swapped to death.
            _write_if(mem / "memory.memsw.limit_in_bytes", limits.memory_max)
        pids = self._dir("pids", box_id)
        if pids and limits.pids_max is not None:
            _write_if(pids / "pids.max", limits.pids_max)

    def limits(self, box_id: str) -> Limits:
        cpu, mem, pids = (self._dir(c, box_id) for c in ("cpu", "memory", "pids"))
        shares = _int(_read(cpu / "cpu.shares")) if cpu else None
        mem_max = _int(_read(mem / "memory.limit_in_bytes")) if mem else None
        if mem_max is not None and mem_max >= 1 << 62:  # the kernel's "unlimited" (page-rounded LONG_MAX)
            mem_max = None
        return Limits(cpu_weight=round(shares * DEFAULT_CPU_WEIGHT / 1024) if shares else None, memory_max=mem_max,
                      pids_max=_int(_read(pids / "pids.max")) if pids else None)

    def _freeze(self, box_id: str, leaf: str | None, on: bool) -> bool:
        d = self._dir("freezer", box_id, leaf)
        if d is None:
            return False
        try:
            (d / "freezer.state").write_text("FROZEN" if on else "THAWED")
        except OSError:
            return False
        if on:  # FREEZING until every task stopped; a task in uninterruptible sleep can delay it
            _wait(lambda: _read(d / "freezer.state").strip() == "FROZEN", 1.0)
        return True

    def usage(self, box_id: str) -> Usage | None:
        if not self.exists(box_id):
            return None
        acct = self._dir("cpuacct", box_id)
        cpu = (_int(_read(acct / "cpuacct.usage")) or 0) / 1e9 if acct else 0.0
        mem = self._dir("memory", box_id)
        current = peak = None
        if mem:
            current = _int(_read(mem / "memory.usage_in_bytes"))
            if current is not None:
                current = max(0, current - _keyed(_read(mem / "memory.stat")).get("total_inactive_file", 0))
            peak = _int(_read(mem / "memory.max_usage_in_bytes"))
        pids = self._dir("pids", box_id)
        rd = wr = None
        blkio = self._dir("blkio", box_id)
        if blkio:
            rd = wr = 0
            for line in _read(blkio / "blkio.throttle.io_service_bytes_recursive").splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[1] == "Read":
                    rd += int(parts[2])
                elif len(parts) == 3 and parts[1] == "Write":
                    wr += int(parts[2])
        return Usage(cpu_seconds=cpu, memory_bytes=current, memory_peak_bytes=peak,
                     pids=_int(_read(pids / "pids.current")) if pids else len(self.pids(box_id)),
                     io_read_bytes=rd, io_write_bytes=wr)

    def oom_kills(self, box_id: str) -> dict[str, int]:
        # v1 counts a kill only in the victim's own cgroup (the leaf), not in the box above it.
        out = {}
        mem = self._dir("memory", box_id)
        if mem is None:
            return out
        for leaf in self.leaves(box_id):
            control = _keyed(_read(mem / leaf / "memory.oom_control"))
            if "oom_kill" in control:
                out[leaf] = control["oom_kill"]
        return out


def oom_victims(cgroup_path: str, after_seq: int = -1) -> list[dict]:
    """The kernel's OOM kills under one cgroup (as /proc/<pid>/cgroup names it), from its log.

    Each: {"seq", "leaf", "pid", "task"}; `after_seq` skips what was already reported.
    /dev/kmsg is readable by root only (and not in every container): [] when it cannot be read.
    """
    prefix = cgroup_path.rstrip("/") + "/"
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return []
    out = []
    try:
        while True:
            try:
                rec = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError:  # EPIPE: the ring buffer overtook us; go on from the next record
                continue
            if not rec:
                break
            head, _, msg = rec.decode("utf-8", "replace").partition(";")
            if not msg.startswith("oom-kill:"):
                continue
            seq = int(head.split(",")[1])
            fields = dict(f.partition("=")[::2] for f in msg.strip().split(",") if "=" in f)
            task_cg = fields.get("task_memcg", "")
            if seq <= after_seq or not task_cg.startswith(prefix):
                continue
            out.append({"seq": seq, "leaf": task_cg[len(prefix):].split("/")[0],
                        "pid": int(fields.get("pid", "0") or 0), "task": fields.get("task", "?")})
    finally:
        os.close(fd)
    return out


class OomWatch:
    """The OOM kills in one box since the last look (the supervisor asks after a SIGKILL and every tick).

    Counts come from the leaves' counters (exact); names from the kernel log when it can be
    read. Kills from before the watch started are not reported again.
    """

    def __init__(self, home: Path | str, box_id: str) -> None:
        backend = for_home(home)
        self.backend = backend if backend is not None and backend.exists(box_id) else None
        self.box_id = box_id
        self._lock = threading.Lock()
        self._seen = self.backend.oom_kills(box_id) if self.backend else {}
        self._path = self.backend.relative(box_id) if self.backend else ""
        self._seq = max([v["seq"] for v in oom_victims(self._path)] or [-1]) if self.backend else -1

    def new_kills(self) -> list[dict]:
        """[{"leaf", "pid", "task"}] per kill not reported yet (pid and task None when the log cannot tell)."""
        if self.backend is None:
            return []
        with self._lock:
            counts = self.backend.oom_kills(self.box_id)
            fresh = {leaf: n - self._seen.get(leaf, 0) for leaf, n in counts.items() if n > self._seen.get(leaf, 0)}
            self._seen.update(counts)
            if not fresh:
                return []
            victims = oom_victims(self._path, after_seq=self._seq)
            self._seq = max([v["seq"] for v in victims] or [self._seq])
        out = []
        for leaf, n in sorted(fresh.items()):
            named = [v for v in victims if v["leaf"] == leaf][-n:]
            out += [{"leaf": leaf, "pid": v["pid"], "task": v["task"]} for v in named]
            out += [{"leaf": leaf, "pid": None, "task": None}] * (n - len(named))
        return out

    def memory_max(self) -> int | None:
        return self.backend.limits(self.box_id).memory_max if self.backend else None


# ---------------------------------------------------------------- detection

_cache: dict[str, tuple[Cgroups | None, str | None]] = {}


def for_home(home: Path | str) -> Cgroups | None:
    """The box cgroups of this home, or None when this host cannot make them (see `unavailable`)."""
    return _detect(home)[0]


def unavailable(home: Path | str) -> str | None:
    """Why boxes run without cgroups here (one sentence for doctor), or None when they have them."""
    return _detect(home)[1]


def _detect(home: Path | str) -> tuple[Cgroups | None, str | None]:
    key = str(home)
    if key not in _cache:
        _cache[key] = detect(home_key(home))
    return _cache[key]


def detect(key: str, mountinfo: str | None = None) -> tuple[Cgroups | None, str | None]:
    """Pick the backend for this host: (backend, None) or (None, the reason there is none)."""
    if settings.CGROUPS.off():
        return None, "cgroups are turned off by WTBOX_CGROUPS=off"
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError as e:
            return None, f"/proc/self/mountinfo cannot be read ({e.strerror})"
    v1: dict[str, Path] = {}
    v2_root = None
    for line in mountinfo.splitlines():
        pre, _, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        point = Path(fields[4].replace("\\040", " "))
        if tail[0] == "cgroup2" and point == CGROUP_FS:
            v2_root = point
        elif tail[0] == "cgroup":
            for opt in tail[2].split(","):
                if opt in ("cpu", "cpuacct", "memory", "pids", "freezer", "blkio"):
                    v1.setdefault(opt, point)
    if v2_root is not None:
        return _detect_v2(v2_root, key)
    if not v1:
        return None, "no cgroup filesystem is mounted at /sys/fs/cgroup"
    writable = {c: m for c, m in v1.items() if os.access(m, os.W_OK)}
    if not writable:
        some = next(iter(v1.values()))
        return None, (f"the cgroup v1 hierarchies (e.g. {some}) are not writable by uid {os.geteuid()}; "
                      "run wtbox as root to get per-box limits")
    return CgroupsV1(writable, key), None


def _detect_v2(fs: Path, key: str) -> tuple[Cgroups | None, str | None]:
    if os.access(fs / "cgroup.procs", os.W_OK) and os.access(fs, os.W_OK):
        return CgroupsV2(fs, key, outside=fs), None
    try:
        own = next(line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::"))
    except (OSError, StopIteration):
        return None, "/proc/self/cgroup shows no cgroup v2 path"
    parts = [p for p in own.strip("/").split("/") if p]
    ours = [i for i, p in enumerate(parts) if p.startswith("wtbox-")]
    if ours:  # a process of a box: start from where the box hangs
        parts = parts[:ours[0]]
    uid = os.geteuid()
    delegated = None
    for i in range(len(parts), 0, -1):  # the highest ancestor we own is the delegated subtree
        d = fs.joinpath(*parts[:i])
        try:
            owned = d.stat().st_uid == uid and os.access(d / "cgroup.procs", os.W_OK)
        except OSError:
            owned = False
        if not owned:
            break
        delegated = d
    if delegated is None:
        here = fs.joinpath(*parts) if parts else fs
        return None, (f"cgroup v2 gives uid {uid} no delegated subtree ({here} is not writable); run wtbox as "
                      "root, or under 'systemd-run --user --scope -p Delegate=yes'")
    return CgroupsV2(delegated, key, outside=delegated), None


# ---------------------------------------------------------------- small helpers

def _members(d: Path) -> set[int]:
    """pids in d and every cgroup below it (zombies are not listed: they cannot run)."""
    out: set[int] = set()
    for dirpath, _dirs, _files in os.walk(d):
        for line in _read(Path(dirpath) / "cgroup.procs").split():
            out.add(int(line))
    return out


def _rmtree_cgroup(d: Path, timeout: float = 2.0) -> None:
    """rmdir d and its children, deepest first (cgroupfs dirs hold only control files)."""
    if not d.is_dir():
        return
    for dirpath, _dirs, _files in os.walk(d, topdown=False):
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.rmdir(dirpath)
                break
            except FileNotFoundError:
                break
            except OSError:  # EBUSY while the last killed task is still exiting
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)


def _sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read(path: Path) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _write_if(path: Path, value: int) -> bool:
    """Write a limit when the controller offers the file; False when it does not."""
    try:
        fd = os.open(path, os.O_WRONLY)  # never O_CREAT: cgroupfs refuses that with EACCES
    except FileNotFoundError:
        return False
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)
    return True


def _int(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() else None


def _keyed(text: str) -> dict[str, int]:
    """'key value' lines (cpu.stat, memory.stat, memory.events, oom_control) → dict."""
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if v.strip().isdigit():
            out[k] = int(v)
    return out


def _wait(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True
