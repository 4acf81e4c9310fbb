"""What a box's cgroup is: its names, limits and usage, and the interface both backends implement."""
from __future__ import annotations

import copy
import dataclasses
import os
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

from worktreebox.settings import kill_wait
from worktreebox.system.cgroups.files import keyed, members, read, rmtree, sigkill, write_if

SUPERVISOR, METRICS, TRACES, EXEC, SETUP, MIGRATE, RUN, BROWSER = (
    "_supervisor", "_metrics", "_traces", "_exec", "_setup", "_migrate", "_run", "_browser")
CGROUP_FS = Path("/sys/fs/cgroup")
DEFAULT_CPU_WEIGHT = 100  # cgroup v2's default; v1 cpu.shares 1024 is the same share


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


_HEX = re.compile(r"[0-9a-f]{8}$")
_BOX_DIR = re.compile(r"wtbox-([0-9a-f]{8})-(.+)")


def key_of(box_id: str) -> str:
    """What names a box's cgroup: the 8 hex digits its id ends with (the id itself otherwise)."""
    m = _HEX.search(box_id)
    return m.group(0) if m else box_id


def home_key(home: Path | str) -> str:
    """8 hex digits naming one $WTBOX_HOME in cgroup paths."""
    return str(_sha256(os.path.realpath(home).encode()).hexdigest()[:8])


def _sha256(data: bytes) -> Any:
    """The interpreter's built-in SHA-256 where it has one: `import hashlib` loads OpenSSL, 3.8 MB
    of the RSS of every box's supervisor (which names its cgroups and output files by this key)."""
    import importlib

    for name in ("_sha256", "_sha2"):  # Python 3.11; 3.12+
        try:
            return importlib.import_module(name).sha256(data)
        except ImportError:
            continue
    import hashlib

    return hashlib.sha256(data)


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
        out: set[str] = set()
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
        for b, d in zip(self.bases, self.box_dirs(box_id), strict=True):
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
            out |= members(d)
        return out

    # -- ending
    def kill(self, box_id: str, leaf: str | None = None, *, spare: Iterable[int] = (),
             timeout: float | None = None) -> set[int]:
        """SIGKILL every process in the box's cgroup (or one leaf) and wait until it is empty
        (up to `timeout`, by default KILL_WAIT: settings.kill_wait).

        `spare` (the caller and its ancestors, e.g. `wtbox rm` run from `wtbox shell`) are
        moved out first. Returns the pids that were killed.
        """
        dirs = [d for d in self.box_dirs(box_id, leaf) if d.is_dir()]
        if not dirs:
            return set()
        self._thaw_frozen(box_id, leaf)
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
                    sigkill(pid)
            finally:
                if frozen:
                    self._freeze(box_id, leaf, False)
        deadline = time.monotonic() + (kill_wait() if timeout is None else timeout)
        while True:
            left = self.pids(box_id, leaf) - spare
            if not left:
                return killed
            if time.monotonic() > deadline:
                raise OSError(f"{len(left)} processes in the cgroup of {box_id} survived SIGKILL "
                              f"(pids {', '.join(map(str, sorted(left)[:5]))})")
            for pid in left - killed:  # forked before the kill reached them (no freezer here)
                sigkill(pid)
            killed |= left
            time.sleep(0.005)

    def _thaw_frozen(self, box_id: str, leaf: str | None) -> None:
        """Thaw frozen leaves (a snapshot's, a disk_max stop, an older wtbox's sleeping store): on v1
        a frozen task takes no signal, not even SIGKILL."""
        for name in [leaf] if leaf else self.leaves(box_id):
            if self._is_frozen(box_id, name):
                self._freeze(box_id, name, False)

    def freeze(self, box_id: str, on: bool, *, spare: Iterable[int] = ()) -> list[str]:
        """Freeze (or thaw) the box's processes, leaf by leaf, skipping a leaf that holds one of
        `spare` (a snapshot taken from a shell inside the box must not freeze itself); the leaves
        done. A frozen task stops where it is, in the kernel; thawed, it goes on unaware."""
        spare = set(spare)
        done = []
        for leaf in self.leaves(box_id):
            if on and spare & self.pids(box_id, leaf):
                continue
            if self._freeze(box_id, leaf, on):
                done.append(leaf)
        return done

    def frozen(self, box_id: str) -> list[str]:
        """Leaves of the box left frozen (by a snapshot that was killed half-way; a sleeping store is
        stopped, not frozen: telemetry/store_sleep.py)."""
        return [leaf for leaf in self.leaves(box_id) if self._is_frozen(box_id, leaf)]

    def _is_frozen(self, box_id: str, leaf: str) -> bool:
        return False

    def _kill_at_once(self, box_id: str, leaf: str | None) -> bool:
        """Kill the whole subtree in one kernel operation, if this backend can."""
        return False

    def _freeze(self, box_id: str, leaf: str | None, on: bool) -> bool:
        return False

    def _evict(self, dirs: list[Path], spare: set[int]) -> set[int]:
        """Move spared processes out of the dirs; those that could not be moved."""
        inside = set()
        for d in dirs:
            inside |= members(d) & spare
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
            rmtree(d)

    def remove_leaf(self, box_id: str, leaf: str) -> None:
        for d in self.box_dirs(box_id, leaf):
            rmtree(d)

    # -- accounting
    def cpu_dir(self, box_id: str) -> Path | None:
        """The box's directory in the hierarchy that has the cpu controller."""
        return self.box_dirs(box_id)[0]

    def cpu_pids(self, box_id: str) -> set[int]:
        """Live processes of the box from the cpu hierarchy alone (every process of a box is in
        each hierarchy: one walk instead of one per hierarchy, for a caller that looks often)."""
        d = self.cpu_dir(box_id)
        return members(d) if d is not None else set()

    def set_background(self, box_id: str, on: bool) -> bool:
        """`cpu.idle` of the box (Linux >= 5.15): a background box gets what the others leave and
        never delays their wake-ups (background.py says when). False when the kernel has no such file."""
        d = self.cpu_dir(box_id)
        try:
            return d is not None and write_if(d / "cpu.idle", 1 if on else 0)
        except OSError:
            return False

    def background(self, box_id: str) -> bool:
        d = self.cpu_dir(box_id)
        return d is not None and read(d / "cpu.idle").strip() == "1"

    def usage(self, box_id: str) -> Usage | None:
        raise NotImplementedError

    def oom_event(self, box_id: str) -> Callable[[], bool] | None:
        """A call that blocks until the kernel's OOM killer acts in the box (True), or the box's
        cgroup is gone (False); None when this host cannot tell."""
        return None

    def cpu_seconds(self, box_id: str, leaf: str | None = None) -> float | None:
        """CPU used so far by the box (or one leaf): one file read, for a watch that looks often."""
        raise NotImplementedError

    def freeze_box(self, box_id: str, on: bool, *, spare: Iterable[str] = (SUPERVISOR,)) -> None:
        """Freeze (or thaw) every leaf of the box but `spare`: its processes stop where they are."""
        for leaf in self.leaves(box_id):
            if leaf not in spare:
                self._freeze(box_id, leaf, on)

    def pids_refused(self, box_id: str) -> int:
        """How often the box's pids_max refused a new process or thread (pids.events "max", v1 and v2).
        Kernels count it in the cgroup that forked (a leaf) or in the one whose limit was hit: both."""
        dirs = [*self.box_dirs(box_id), *(d for leaf in self.leaves(box_id) for d in self.box_dirs(box_id, leaf))]
        return sum(keyed(read(d / "pids.events")).get("max", 0) for d in dirs)

    def oom_kills(self, box_id: str) -> dict[str, int]:
        """Per leaf: processes the kernel's OOM killer ended there (cumulative while the leaf exists)."""
        raise NotImplementedError

    def limits(self, box_id: str) -> Limits:
        """The limits in force, read back from the cgroup."""
        raise NotImplementedError

    def relative(self, box_id: str, leaf: str | None = None) -> str:
        """The cgroup path as a process's cgroup file shows it (first hierarchy)."""
        return "/" + str(self.box_dirs(box_id, leaf)[0].relative_to(self.mount_points[0]))
