"""Spare sandboxes: a box's holder made ahead, so that `new` does not wait for one.

Making a holder is most of what a sandbox adds to `new` (measured in README, "Spare sandboxes"):
bubblewrap's start, then three waits on the kernel at once (moving it into its cgroup and loading
its firewall each wait for an RCU grace period on a cgroup v1 host; slirp4netns's start), while
the checkout it runs beside takes ~10 ms. So after a sandboxed `new`, a detached, niced process
(a fork of the home's zygote where one runs, else `python -m worktreebox.providers.sandbox.spares
HOME KEY WANTED TTL DELAY`) makes one, once DELAY seconds passed (WTBOX_SANDBOX_SPARE_DELAY: what
follows the `new` runs first), for the next `new` of the same *recipe*: what the holder is made of
besides the box's own dirs (the repository's git dir, the toolchains it binds, the network, whether
it reaches a database). Spares are found by a key of what the recipe is worked out from (the
repository, the PATH, the network, ...: no walk of the toolchains), and checked against the recipe
worked out anew while the box is made, beside its checkout (`fits`). A spare is a box dir without a box:

    boxes/spare-<hex>/            its worktree, cache, tmp, home, git, browser, endpoint dirs
    boxes/spare-<hex>/run/spare.json   {key, recipe, maker, made_at, ready, blocked}: written before any piece
    boxes/spare-<hex>/run/launcher.sock  its supervisor's launcher, forked ahead by the home's zygote
                                         (services/zygote.py: already in the box's cgroup)

Taking one (`take`, in `new`, before the box's registry row) renames run/spare.json to
run/taken-<pid>-<start>.json: one taker wins, and its identity is in the name. The box gets the
spare's hex (its cgroup is the spare's: cgroups are named by hex), its row is inserted, then the
dir is renamed to the box's. Inside the holder the box's dir becomes a symlink to the spare's and
its hostname the box id (`Sandbox.alias`). The spare's name stays the box's alias
(data["spare"], Box.alias): rm and gc count what runs under it as the box's.

A spare nobody takes ends itself after `ttl` seconds (its holder's shell waits that long, then
sleeps on only if endpoint/.taken exists: `take` leaves it); gc leaves alone what `kept` names
(made by a live maker, ready with a live holder, or taken by a live taker) and removes the rest
as orphans, and every spare with `gc --spares`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from worktreebox.providers.sandbox.base import LEAF, Bind, Spec, load
from worktreebox.system import cgroups, procs
from worktreebox.system.fsutil import LockBusy, atomic_write, file_lock

PREFIX = "spare-"
RECORD = "spare.json"  # under run/
TAKEN = "taken-"  # run/taken-<pid>-<start>.json once taken
TAKEN_MARK = ".taken"  # in the endpoint dir: the holder sleeps on past its ttl (see namespaces.hold_command)
ENDPOINT = "endpoint"
SPARES_DIR = "spares"  # in the home: <key>.json (the recipe), <key>.lock (one maker per recipe), <key>.log


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a holder is made of besides which box it is: binds outside the box dir (absolute) and
    under it (relative), the provider, the network and whether the box reaches a database."""

    provider: str
    network: str
    gateway: bool
    outside: tuple[tuple[str, bool], ...]
    inside: tuple[tuple[str, bool], ...]

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {"provider": self.provider, "network": self.network, "gateway": self.gateway,
                "outside": [list(b) for b in self.outside], "inside": [list(b) for b in self.inside]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Recipe:
        return cls(str(data["provider"]), str(data["network"]), bool(data["gateway"]),
                   tuple((str(p), bool(w)) for p, w in data["outside"]),
                   tuple((str(p), bool(w)) for p, w in data["inside"]))

    @classmethod
    def of(cls, provider: str, network: str, gateway: bool, binds: list[Bind], box_dir: Path) -> Recipe:
        outside, inside = [], []
        for b in binds:
            if b.src == box_dir or box_dir in b.src.parents:
                inside.append((str(b.src.relative_to(box_dir)), b.writable))
            else:
                outside.append((str(b.src), b.writable))
        return cls(provider, network, gateway, tuple(outside), tuple(inside))

    def binds(self, box_dir: Path) -> list[Bind]:
        return [*(Bind(box_dir / p, w) for p, w in self.inside), *(Bind(Path(p), w) for p, w in self.outside)]


def boxes_dir(home: Path) -> Path:
    return home / "boxes"


def _dirs(home: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(boxes_dir(home))
                if e.name.startswith(PREFIX) and e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _record(d: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((d / "run" / RECORD).read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _taker(d: Path) -> list[int] | None:
    """The identity (pid, start) in a taken spare's run/taken-<pid>-<start>.json, or None."""
    try:
        names = [e.name for e in os.scandir(d / "run") if e.name.startswith(TAKEN)]
    except OSError:
        return None
    for name in names:
        parts = name[len(TAKEN):].removesuffix(".json").split("-")
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            return [int(parts[0]), int(parts[1])]
    return None


def _holder_alive(d: Path) -> bool:
    holder = load(d / "run")
    return holder is not None and procs.is_alive(holder.identity)


def _untaken_alive(d: Path, rec: dict[str, Any]) -> bool:
    """An untaken spare that is, or will be, of use: ready with a live holder, or its maker lives."""
    return _holder_alive(d) if rec.get("ready") else procs.is_alive(rec.get("maker"))


def _taken_file(d: Path) -> Path:
    """Where this process's take of the spare `d` is recorded (run/taken-<pid>-<start>.json)."""
    ident = procs.identity(os.getpid()) or [os.getpid(), 0]
    return d / "run" / f"{TAKEN}{ident[0]}-{ident[1]}.json"


def kept(home: Path, *, taken_only: bool = False) -> set[str]:
    """The spares gc must leave alone: being made (its maker lives), ready (its holder lives), or
    being taken (its taker lives: it inserts its row, then renames the dir to its box's); with
    `taken_only`, only those (`gc --spares` removes the rest)."""
    out = set()
    for d in _dirs(home):
        rec = _record(d)
        if rec is not None:
            alive = not taken_only and _untaken_alive(d, rec)
        else:
            alive = procs.is_alive(_taker(d))
        if alive:
            out.add(d.name)
    return out


def count(home: Path, key: str) -> int:
    """Spares of `key` ready or being made (not taken)."""
    n = 0
    for d in _dirs(home):
        rec = _record(d)
        if rec is not None and rec.get("key") == key and _untaken_alive(d, rec):
            n += 1
    return n


def take(home: Path, key: str, ttl: float) -> tuple[str, dict[str, Any]] | None:
    """A ready spare of `key` with a live holder and time left, now ours: its id and its record (what
    `fits` checks), or None."""
    now = time.time()
    latest = ttl - min(30.0, ttl / 4)  # a spare about to end itself is left to end (its shell reads the mark at ttl)
    for d in _dirs(home):
        rec = _record(d)
        if rec is None or rec.get("key") != key or not rec.get("ready") or now - float(rec.get("made_at", 0)) > latest:
            continue
        if not _holder_alive(d):
            continue
        try:
            os.rename(d / "run" / RECORD, _taken_file(d))
        except FileNotFoundError:
            continue  # another `new` took it first
        (d / ENDPOINT / TAKEN_MARK).touch()
        return d.name, rec
    return None


def fits(record: dict[str, Any], recipe: Recipe, blocked: list[str]) -> bool:
    """Whether a taken spare's holder is what the box's would be: made of the same recipe (a toolchain
    installed since moves what a box must bind), its firewall made with the host's addresses of now
    (`blocked`: an interface or a docker bridge that came up since would be reachable from it)."""
    return record.get("recipe") == recipe.key and record.get("blocked") == blocked


def give_back(home: Path, spare: str) -> None:
    """A spare taken by a `new` that failed before its row: ready again for the next one."""
    d = boxes_dir(home) / spare
    try:
        os.rename(_taken_file(d), d / "run" / RECORD)
        (d / ENDPOINT / TAKEN_MARK).unlink(missing_ok=True)
    except OSError:
        pass  # gone: gc removes what is left once we exit


def move_in(home: Path, spare: str, box_dir: Path) -> bool:
    """The taken spare's dir becomes the box's (after the box's row exists: see the module docstring)."""
    try:
        os.rename(boxes_dir(home) / spare, box_dir)
    except OSError:
        return False
    for e in os.scandir(box_dir / "run"):
        if e.name.startswith(TAKEN):
            os.unlink(e.path)
    return True


# ---------------------------------------------------------------- the maker

def paths(home: Path, key: str) -> tuple[Path, Path, Path]:
    d = home / SPARES_DIR
    return d / f"{key}.json", d / f"{key}.lock", d / f"{key}.log"


def make(home: Path, key: str, recipe: Recipe, ttl: float) -> str:
    """One spare of `recipe`, found by `key` (this process is its maker); its id."""
    from worktreebox.providers import sandbox
    from worktreebox.providers.sandbox import gitdir, network

    box_id = PREFIX + secrets.token_hex(4)
    d = boxes_dir(home) / box_id
    d.mkdir(mode=0o700)
    (d / "run").mkdir(mode=0o700)
    blocked = network.host_addresses()  # what its firewall is made with (see `fits`): read once for both
    record = {"key": key, "recipe": recipe.key, "maker": procs.identity(os.getpid()), "made_at": time.time(),
              "ready": False, "blocked": blocked}
    atomic_write(d / "run" / RECORD, json.dumps(record))  # before any piece: gc keeps it while we live
    for p, _ in recipe.inside:
        (d / p).mkdir(parents=True, exist_ok=True)
    gitdir.prepare(d / "git", d / "worktree")  # what the box's git dir will hold, made now: see there
    spec = Spec(box_id, home, d, recipe.binds(d), network=recipe.network, gateway=recipe.gateway,
                expires=ttl, keep_if=d / ENDPOINT / TAKEN_MARK, blocked=tuple(blocked))
    backend = cgroups.for_home(home)
    leaf = None
    if backend is not None:  # the box's cgroup, as the cgroup resource makes it (it sets the box's limits later)
        from worktreebox.system import home_records

        home_records.note(cgroups.home_key(home), home)
        backend.create(box_id, cgroups.Limits())
        leaf = cgroups.Leaf(home, box_id, LEAF)
    provider = sandbox.get(recipe.provider)
    try:
        provider.create(spec, cgroup=leaf)
        if leaf is not None:  # the box's supervisor, forked ahead into its cgroup leaf (where a zygote runs)
            from worktreebox.services import zygote

            zygote.prefork(home, box_id, ttl)
    except BaseException:
        provider.destroy(box_id, d)
        shutil.rmtree(d, ignore_errors=True)
        raise
    atomic_write(d / "run" / RECORD, json.dumps({**record, "ready": True, "made_at": time.time()}))
    return box_id


def main(argv: list[str]) -> int:
    """`python -m worktreebox.providers.sandbox.spares HOME KEY WANTED TTL [DELAY]`: after DELAY seconds,
    make spares of the recorded recipe until WANTED are ready (one maker per recipe: a second exits at
    once, also while the first waits). The wait is for what follows the `new` that asked: an agent's
    `exec` right after it measured ~8 ms slower while a maker ran beside it (its bubblewrap,
    slirp4netns and nftables processes), and the next `new` comes later than that."""
    home, key, wanted, ttl = Path(argv[0]), argv[1], int(argv[2]), float(argv[3])
    delay = float(argv[4]) if len(argv) > 4 else 0.0
    recipe_file, lock, _ = paths(home, key)
    me = _maker_file(home, key)
    try:
        with file_lock(lock, timeout=0, what="the spare maker"):
            atomic_write(me, json.dumps(procs.identity(os.getpid())))  # what `gc --spares` ends (stop_makers)
            try:
                time.sleep(max(0.0, delay))
                recipe = Recipe.from_json(json.loads(recipe_file.read_text()))
                while count(home, key) < wanted:
                    print(f"made {make(home, key, recipe, ttl)}", flush=True)
            finally:
                me.unlink(missing_ok=True)
    except LockBusy:
        return 0
    except FileNotFoundError as e:  # the home went away while it waited (a deleted test or bench home)
        print(f"nothing made: {e.filename} is gone", flush=True)
    return 0


def _maker_file(home: Path, key: str) -> Path:
    return home / SPARES_DIR / f"{key}.maker"


def stop_makers(home: Path) -> list[int]:
    """End every maker of this home, waiting or making (`gc --spares`: none may make a spare after
    it); what one was making is then an orphan gc removes. The pids ended."""
    out = []
    for f in (home / SPARES_DIR).glob("*.maker"):
        try:
            ident = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if procs.is_alive(ident):
            procs.stop_pid(ident[0])
            out.append(ident[0])
        f.unlink(missing_ok=True)
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
