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

from typing import TYPE_CHECKING

from worktreebox.providers import PROVIDERS as _TABLE
from worktreebox.providers import choose as _choose
from worktreebox.providers.sandbox.base import Holder, Sandbox, load
from worktreebox.system import procs

if TYPE_CHECKING:
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


def launcher_for(box: Box) -> procs.Launcher:
    """How a process of this box is started: through its sandbox (SandboxGone, one sentence, when
    its holder is not running), or as is when the box is not sandboxed."""
    if not sandboxed(box):
        return procs.Launcher()
    from worktreebox.providers.sandbox.base import SandboxGone

    try:
        return provider_of(box).launcher(load(box.run_dir))
    except SandboxGone:
        raise SandboxGone(f"The sandbox of box {box.id} is not running; 'wtbox up {box.id}' makes it again.") from None


def bring_back(box: Box) -> None:
    """A sandboxed box's branch into its repository (its git dir is its own: gitdir.fetch_back, whose
    git-upload-pack runs inside the box); nothing to do for a box whose branch lives there already."""
    if not sandboxed(box):
        return
    from pathlib import Path

    from worktreebox.providers.sandbox import gitdir

    gitdir.fetch_back(Path(box.repo), box.dir / "git", box.branch, launcher_for(box).command([], box.path))
