"""A box as a sandbox: its own processes, files and network (the "sandbox" kind of the providers
table in providers/__init__.py; docs/sandbox.md says what a box can and cannot do in each mode).

`namespaces` (bubblewrap for the pid, mount, ipc, uts and, unprivileged, user namespaces; pasta
and nftables for the network; nsenter + setpriv as the one launcher) where the host has the
tools, else `off` (today's behaviour: nothing but cgroups, names and leases between boxes).
`[host] sandbox` will force one; `choose(None)` takes the first that works here.
"""
from __future__ import annotations

from worktreebox.providers import PROVIDERS as _TABLE
from worktreebox.providers import choose as _choose
from worktreebox.providers.sandbox.base import Sandbox

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
