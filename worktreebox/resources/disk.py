"""[box] disk_max: a limit on the box's own files, enforced by the filesystem where this host can.

`image` (root, with loop devices, mkfs.ext4 and mount): the box's directory `boxes/<id>/` is a
loop-mounted ext4 of disk_max made for the box (`disks/<box hex>.img`, sparse: it costs only
what the box writes; 1 GB made and mounted in 26 ms on a quiet machine), so the kernel refuses a write past the limit
(ENOSPC) to every process of the box, and the host's disk never fills. Everything of the box's
own lives there: its worktree changes (the overlay's upper layer) and dependency layer changes,
TMPDIR, XDG_CACHE_HOME, logs, metrics, traces. Not what a box writes outside its directory
(its HOME, /tmp when it is not sandboxed) nor its database rows (the shared PostgreSQL).

`watch` otherwise (not root, no loop devices, or WTBOX_DISK_WATCH=1): the box's supervisor counts
its own bytes every few seconds and freezes its processes past the limit (services/diskwatch.py);
a box without services has no supervisor, and `new` says that nothing keeps its limit. `doctor`
says which applies and why. Project quotas (XFS/ext4 prjquota) would enforce it without root's loop
devices, but this machine's kernel has no quota support to build and test them on.

Made first (everything after it writes into the box dir), destroyed last: unmounting frees every
file at once. The image is named by the box's hex, which a claim from the warm pool keeps.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worktreebox import settings
from worktreebox.box import hex_of
from worktreebox.errors import WtboxError
from worktreebox.resources.base import Creation, Resource, ids_by_hex, warn

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.context import HostContext

IMAGE, WATCH = "image", "watch"
_TOOLS = ("mkfs.ext4", "mount")
_WATCHED = "watched by the box's supervisor, which freezes the box's processes past it (services/diskwatch.py)"


def mode(host: HostContext) -> tuple[str, str]:
    """(how disk_max is kept on this host, why)."""
    if settings.DISK_WATCH.on():
        return WATCH, f"WTBOX_DISK_WATCH=1: {_WATCHED}"
    if os.geteuid() != 0:
        return WATCH, f"not root, so no loop-mounted filesystem per box: {_WATCHED}"
    missing = [t for t in _TOOLS if not shutil.which(t)]
    if missing:
        return WATCH, f"{', '.join(missing)} not installed (e2fsprogs, mount): {_WATCHED}"
    if not os.path.exists("/dev/loop-control"):
        return WATCH, f"no loop devices (/dev/loop-control is missing): {_WATCHED}"
    return IMAGE, "each box's directory is a loop-mounted ext4 of its disk_max: a write past it fails (ENOSPC)"


def image_of(host: HostContext, box: Box) -> Path:
    return host.home / "disks" / f"{hex_of(box.id)}.img"


class Disk(Resource):
    name = "disk"
    parallel = False  # the box dir itself: everything after it writes into it

    def create(self, c: Creation) -> None:
        limit = c.config.box.limits.over(c.host.config.box_limits).disk_max  # a repo's [box] over the host's
        if not limit:
            return
        how, why = mode(c.host)
        c.box.data[self.name] = {"max": limit, "mode": how}
        if how == WATCH:
            if not c.config.services:
                warn("[box] disk_max is watched by the box's services supervisor here, and this box runs no "
                     f"services: nothing keeps it ({why.split(':')[0]})")
            return
        image = image_of(c.host, c.box)
        c.box.data["revive"] = True  # a reboot takes the mount: Host.get mounts it again
        make_image(image, limit)
        from worktreebox.resources import sandbox

        # boxes/ made a shared bind of itself (a sandboxed home) before this mount, not over it: a
        # bind made later hid the image, and the box wrote past its limit into what was beneath
        sandbox.decide(c)
        attach(image, c.box.dir)

    def revive(self, host: HostContext, box: Box) -> None:
        data = box.data.get(self.name) or {}
        image = image_of(host, box)
        if data.get("mode") == IMAGE and image.exists() and not _mounted(box.dir):
            attach(image, box.dir)

    def destroy(self, host: HostContext, box: Box) -> None:
        from worktreebox.providers.mounts.base import Mount, unmount

        if box.dir.is_symlink():
            return  # a claimed pool box's old name: the image is the box's, removed under its real id
        if _mounted(box.dir):
            unmount(Mount(str(box.dir), "ext4", "", ""))
        image_of(host, box).unlink(missing_ok=True)

    def discover(self, host: HostContext) -> set[str]:
        """Boxes with an image (named by the hex: the registry's id, else the box dir's)."""
        try:
            hexes = {p.stem for p in (host.home / "disks").glob("*.img")}
        except OSError:
            return set()
        return ids_by_hex(host, hexes, "disk-")

    def health(self, host: HostContext, box: Box) -> str | None:
        """A watched box frozen for its disk_max (one stat)."""
        from worktreebox.services.diskwatch import FULL_MARK

        if (box.data.get(self.name) or {}).get("mode") == WATCH and (box.run_dir / FULL_MARK).exists():
            return (f"it reached its disk_max ({box.data[self.name]['max'] >> 20} MiB) and its processes are frozen; "
                    f"delete files from {box.dir} and they go on")
        return None

    def status(self, host: HostContext, box: Box) -> dict[str, Any] | None:
        data = box.data.get(self.name)
        if not data:
            return None
        out = {"max_bytes": data["max"], "enforced": data["mode"] == IMAGE}
        if data["mode"] == IMAGE and _mounted(box.dir):
            st = os.statvfs(box.dir)
            out["free_bytes"] = st.f_bavail * st.f_frsize
        return {"disk": out}

    def checks(self, host: HostContext) -> list[dict[str, Any]]:
        how, why = mode(host)
        return [{"check": "disk_max", "ok": True, "mode": how,
                 "detail": f"enforced: {why}" if how == IMAGE else f"watched, not enforced: {why}"}]


def make_image(image: Path, size: int) -> None:
    """A sparse file of `size` bytes holding an empty ext4 without a journal (a box is disposable, and
    the journal would take part of a small limit), no blocks reserved for root."""
    image.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(size)
    _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", "-E", "lazy_itable_init=1,root_owner=0:0",
          str(image)], f"making the disk image {image}")


def attach(image: Path, target: Path) -> None:
    """Mount the image on the box dir (a loop device the kernel frees at unmount), as the box dir was."""
    _run(["mount", "-o", "loop,nosuid,nodev", str(image), str(target)], f"mounting {image} on {target}")
    os.chmod(target, 0o700)
    try:
        (target / "lost+found").rmdir()
    except OSError:
        pass


def _mounted(path: Path) -> bool:
    return os.path.ismount(path)


def _run(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise WtboxError(f"{what} failed: {lines[-1] if lines else 'exit ' + str(proc.returncode)}.")
