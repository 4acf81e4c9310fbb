"""Spare sandboxes for `new` (providers/sandbox/spares.py says what a spare is and why).

`take` (Host.new, before the box's row): the box gets a ready spare of its recipe, and with it the
spare's hex. `move_in` (after the row): the spare's dir becomes the box's. The sandbox resource then
starts the box's supervisor in the spare's holder (`with_spare`) instead of making one, and
after the box is made asks for the next spare (`replenish`: a detached, niced maker process, one
per recipe). Only where boxes are sandboxed as root and `[host] sandbox_spares` is above 0; never
for a pooled box (the pool's own box is made ahead already).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from worktreebox import settings
from worktreebox.box import branch_name, hex_of, slugify
from worktreebox.config.assets import PACKAGE_PARENT
from worktreebox.errors import WtboxError
from worktreebox.providers.sandbox import spares
from worktreebox.resources import sandbox
from worktreebox.resources.base import warn
from worktreebox.resources.sandbox import SPARE
from worktreebox.system import afterwards, procs
from worktreebox.system.fsutil import atomic_write

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.config.load import RepoConfig
    from worktreebox.context import HostContext
    from worktreebox.resources.base import Creation

MAKER_NICE = 10


def key(host: HostContext, box: Box, config: RepoConfig) -> str | None:
    """What spares for this box are found by: a digest of what its recipe is worked out from, with no
    walk of the toolchains (`fits` checks the recipe itself later, beside the checkout); None when
    the box gets no spare."""
    made_of = _made_of(host, box, config)
    return None if made_of is None else hashlib.sha256(json.dumps(made_of).encode()).hexdigest()[:16]


def _made_of(host: HostContext, box: Box, config: RepoConfig) -> tuple[str, ...] | None:
    """(provider, network, reaches a database, the PATH the box inherits, home, repository, wtbox's own
    Python and package): all that sandbox.binds and the provider read besides the box's own dir,
    which a recipe names relative to it."""
    if host.config.sandbox_spares <= 0 or box.pool is not None:
        return None
    from worktreebox.services.boxenv import DATA_KEY

    provider, _ = sandbox.choose(host)
    if provider.name == sandbox.OFF or provider.mode != "root":
        return None
    path = (box.data.get(DATA_KEY) or {}).get("PATH") or os.environ.get("PATH", "")
    return (provider.name, config.box.network, str(config.database.mode != "none"), path, str(host.home),
            str(box.repo), sys.executable, sys.prefix, sys.base_prefix, str(PACKAGE_PARENT))


def recipe(host: HostContext, box: Box, config: RepoConfig) -> spares.Recipe | None:
    """What the box's holder is made of (besides its own dirs), or None when it gets no spare; worked
    out once per process for what it is made from (`fits` and `replenish` both ask: ~4 ms, the
    toolchain's walk)."""
    made_of = _made_of(host, box, config)
    if made_of is None:
        return None
    if made_of not in _RECIPES:
        provider, _ = sandbox.choose(host)
        _RECIPES[made_of] = spares.Recipe.of(provider.name, config.box.network, config.database.mode != "none",
                                             sandbox.binds(box, config, provider), box.dir)
    return _RECIPES[made_of]


_RECIPES: dict[tuple[str, ...], spares.Recipe] = {}
_TAKEN: dict[str, dict[str, Any]] = {}  # box id -> the record of the spare it took (what `fits` checks)


def take(host: HostContext, box: Box, config: RepoConfig) -> None:
    """Give the box a ready spare of its key, if there is one: its id takes the spare's hex."""
    k = key(host, box, config)
    got = spares.take(host.home, k, settings.SANDBOX_SPARE_TTL.seconds()) if k is not None else None
    if got is None:
        return
    spare, record = got
    box.id = f"{slugify(box.task)}-{hex_of(spare)}"
    box.branch, box.dir = branch_name(box.id), host.boxes_dir / box.id
    box.data[SPARE] = spare
    _TAKEN[box.id] = record


def fits(host: HostContext, box: Box, config: RepoConfig) -> bool:
    """Whether the spare the box took has the holder the box would get (spares.fits): its recipe worked
    out now, the host's addresses now. Asked by `with_spare`, in the sandbox resource's create beside the
    checkout, rather than in `take`, before everything (~2.3 ms of CPU; on a thread from `take` on it
    measured the same)."""
    from worktreebox.providers.sandbox import network

    record, r = _TAKEN.pop(box.id, None), recipe(host, box, config)
    return record is not None and r is not None and spares.fits(record, r, network.host_addresses())


@contextlib.contextmanager
def taken(host: HostContext, box: Box, config: RepoConfig) -> Iterator[None]:
    """`take`, for the block that makes the box's row: when that fails, the spare is ready again."""
    take(host, box, config)
    try:
        yield
    except BaseException:
        spare = box.data.pop(SPARE, None)
        if spare:
            spares.give_back(host.home, spare)
        raise


def move_in(host: HostContext, box: Box) -> None:
    """The box's dir: its spare's, renamed (after the box's row: gc counts the spare as the box's),
    else a new one (no spare, or it went away: the box's holder is then made as usual)."""
    spare = box.data.get(SPARE)
    if spare and spares.move_in(host.home, spare, box.dir):
        return
    box.data.pop(SPARE, None)
    box.dir.mkdir(mode=0o700)


def replenish(host: HostContext, box: Box, config: RepoConfig) -> bool:
    """Ask for the next spare of this box's recipe when fewer than [host] sandbox_spares are there or
    being made; True when a maker was started (a second maker of a recipe exits at once). Never a
    reason to fail the box: what went wrong is a warning."""
    try:
        return _replenish(host, box, config)
    except (OSError, WtboxError) as e:
        warn(f"No spare sandbox was asked for ({e}); the next 'wtbox new' makes its own.")
    except Exception as e:  # a thread beside `new`: one sentence, as anywhere (the box is whole without it)
        warn(f"No spare sandbox was asked for ({type(e).__name__}: {e}); the next 'wtbox new' makes its own.")
    return False


@contextlib.contextmanager
def replenishing(host: HostContext, box: Box, config: RepoConfig) -> Iterator[None]:
    """`replenish` once a served `new` has answered (asking costs a few ms of files and a fork of the
    zygote, on the box's critical path when done before), else on a thread for the length of the
    block (the rest of `new`: its env, its starts, the wait for its supervisor): system/afterwards.py."""
    if key(host, box, config) is None:
        yield
        return
    with afterwards.beside(functools.partial(replenish, host, box, config)):
        yield


def _replenish(host: HostContext, box: Box, config: RepoConfig) -> bool:
    k, r = key(host, box, config), recipe(host, box, config)
    if k is None or r is None or spares.count(host.home, k) >= host.config.sandbox_spares:
        return False
    recipe_file, _, log = spares.paths(host.home, k)
    wanted = json.dumps(r.to_json())
    try:
        current = recipe_file.read_text()
    except FileNotFoundError:
        recipe_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        current = None
    if current != wanted:  # (most `new`s: the recipe its last maker was given)
        atomic_write(recipe_file, wanted)
    from worktreebox.services import zygote
    from worktreebox.services.boxenv import without_box_vars

    env = {**without_box_vars(), "WTBOX_HOME": str(host.home)}
    argv = [str(host.home), k, str(host.config.sandbox_spares), str(settings.SANDBOX_SPARE_TTL.seconds()),
            str(settings.SANDBOX_SPARE_DELAY.seconds())]
    # a fork of the home's zygote where one runs (no Python start-up, no imports), else a Python of its
    # own, detached (never a zombie child of a long-lived caller: `wtbox mcp`, a test); niced either way
    if not zygote.run_module(host.home, spares.__name__, argv, env=env, log_path=log, nice=MAKER_NICE):
        procs.spawn_detached(["nice", "-n", str(MAKER_NICE), sys.executable, "-m", spares.__name__, *argv],
                             env=env, log_path=log, cwd=PACKAGE_PARENT)
    return True


def with_spare(c: Creation) -> bool:
    """The box took a spare (sandbox_spares.take): its holder is made, network and all. It is checked
    (`fits`), the box's dir named inside it (the holder knows the spare's paths), then the supervisor
    starts in it (in the launcher forked ahead there, services/zygote.py). False when the spare's
    holder ended meanwhile (a `gc --spares` at that moment), or is not what the box's would be: the
    box then makes its own holder. The sandbox resource asks through Creation.use_spare (set by Host.new)."""
    from worktreebox.providers.sandbox.base import save
    from worktreebox.services.client import start_supervisor

    box = c.box
    provider, holder = sandbox.provider_for(box.data[sandbox.NAME]["provider"]), sandbox.holder_of(box)
    if holder is None or not fits(c.host, box, c.config):
        provider.destroy(box.id, box.dir)  # what is left of it, or a holder made for other binds or addresses
        box.data.pop(SPARE)
        return False
    c.provide(sandbox.HOLDER)  # the worktree's view may mount: the holder runs
    provider.alias(holder, box.dir, box.data[SPARE], box.id)  # (no process: a symlink, a host name)
    holder.box_id = box.id  # its record names the box now (what a "not running" sentence says)
    save(box.run_dir, holder)
    start_supervisor(box, c.secrets, [], sandbox.daemon_net(c.host, box, holder), wait=False)
    return True
