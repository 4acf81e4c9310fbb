"""A box as a sandbox: its own processes, files and network (the "sandbox" kind of the providers
table in providers/__init__.py; README.md, "The sandbox", says what a box can and cannot do in
each mode; docs/architecture.md, how).

`namespaces` (bubblewrap for the pid, mount, ipc, uts and, unprivileged, user namespaces;
slirp4netns and nftables for the network; nsenter + setpriv as the one launcher) where the host
has the tools, else `off` (today's behaviour: nothing but cgroups, names and leases between boxes).
`[host] sandbox` forces one; `choose(None)` takes the first that works here.

`launcher_for(box)` is how anything starts a process of an existing box (box.data["sandbox"]
says which provider made it; its holder's record is in run/).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from worktreebox.providers import PROVIDERS as _TABLE
from worktreebox.providers import choose as _choose
from worktreebox.providers.sandbox.base import Holder, Sandbox, load
from worktreebox.system import procs

if TYPE_CHECKING:
    from pathlib import Path

    from worktreebox.box import Box

OFF = "off"
PROVIDERS = _TABLE["sandbox"]


def get(name: str) -> Sandbox:
    return _choose("sandbox", name)()


def choose(forced: str | None = None) -> tuple[Sandbox, str]:
    """The sandbox boxes get here and why (one phrase for doctor): `forced` if given, else the
    first provider that works."""
    if forced is not None:
        return get(forced), "forced by [host] sandbox"
    skipped: list[str] = []
    for name in PROVIDERS:
        provider = get(name)
        why_not = provider.probe()
        if why_not is None:
            why = "the first that works here" + (f" ({'; '.join(skipped)})" if skipped else "")
            return provider, why
        skipped.append(f"{name}: {why_not}")
    raise AssertionError("the off provider always works")  # pragma: no cover


def provider_of(box: Box) -> Sandbox:
    """The provider a box was made with (off for a box made before sandboxes, or without one)."""
    return get((box.data.get("sandbox") or {}).get("provider") or OFF)


def sandboxed(box: Box) -> bool:
    return ((box.data.get("sandbox") or {}).get("provider") or OFF) != OFF


def holder_of(box: Box) -> Holder | None:
    """The box's live holder as recorded, or None (never made, or gone: killed, or a reboot)."""
    holder = load(box.run_dir)
    return holder if holder is not None and procs.is_alive(holder.identity) else None


def launcher_for(box: Box, revive: Callable[[], object] | None = None) -> procs.Launcher:
    """How a process of this box is started: through its sandbox (SandboxGone, one sentence, when
    its holder is not running: with `revive`, after that made it again once), or as is when the box
    is not sandboxed."""
    if not sandboxed(box):
        return procs.Launcher()
    from worktreebox.providers.sandbox.base import SandboxGone

    try:
        return provider_of(box).launcher(load(box.run_dir))
    except SandboxGone:
        if revive is not None:
            revive()
            return launcher_for(box)
        raise SandboxGone(f"The sandbox of box {box.id} is not running; 'wtbox up {box.id}' makes it again.") from None


def bring_back(box: Box, launcher: procs.Launcher | None = None) -> None:
    """A sandboxed box's branch into its repository (its git dir is its own: gitdir.fetch_back, whose
    git-upload-pack runs inside the box); nothing to do for a box whose branch lives there already."""
    if not sandboxed(box):
        return
    from pathlib import Path

    from worktreebox.providers.sandbox import gitdir

    launcher = launcher or launcher_for(box)
    gitdir.fetch_back(Path(box.repo), box.dir / "git", box.branch, launcher.command([], box.path))


def unsaved_work(box: Box, launcher: procs.Launcher) -> str | None:
    """Why removing the box would lose work, or None (git, inside a sandboxed box): its git dir goes
    with it, so what counts as saved there is what its repository holds."""
    from pathlib import Path

    from worktreebox.system import git

    kept = git.tips(box.repo, but=box.branch) if launcher.sandboxed and Path(box.repo).is_dir() else None
    return git.unsaved_work(box.path, box.branch, box.data.get("base_sha"), launcher=launcher, kept=kept)


def release_boxes_dir(home: Path, no_box_left: Callable[[], bool]) -> bool:
    """The last box gone, and no spare sandbox kept (its binds are slaves of this mount): boxes/ is no
    longer a shared mount (see namespaces.share_boxes_dir). True when it was taken down."""
    from worktreebox.providers.sandbox import spares
    from worktreebox.providers.sandbox.namespaces import release_boxes_dir as release

    return release(home, lambda: no_box_left() and not spares.kept(home))


def rename_inside(box: Box, pool_id: str, launcher: procs.Launcher) -> Callable[[], None]:
    """A claimed pool box's names inside its sandbox, in the background (each a few processes, ~20-50
    ms here, while the claim renames the repository's refs): its holder knows its paths by the pool
    id, so the new name is made to lead there (`alias`), and its branch is renamed in its own git dir,
    reached by the old name's path. Returns what waits for both (raising what failed)."""
    if not launcher.sandboxed:
        return lambda: None
    from concurrent.futures import Future, ThreadPoolExecutor

    from worktreebox.box import branch_name
    from worktreebox.system import git

    pool = ThreadPoolExecutor(max_workers=2)
    old_worktree = box.dir.parent / pool_id / box.path.name
    started: list[Future[Any]] = [
        pool.submit(provider_of(box).alias, holder_of(box), box.dir, pool_id),
        pool.submit(git.git, old_worktree, "branch", "-m", branch_name(pool_id), box.branch, launcher=launcher)]

    def wait() -> None:
        try:
            for done in started:
                done.result()
        finally:
            pool.shutdown()
    return wait
