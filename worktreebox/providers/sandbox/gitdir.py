"""Git inside a box: a git dir of the box's own that borrows the repository's objects.

A box must commit on its branch without being able to damage the user's repository or another
box's branch. Its worktree's admin dir lives in `boxes/<id>/git` (the box user's), not in the
repository's `.git/worktrees/`:

- `objects/info/alternates` names the repository's object store, bound read-only inside: every
  object of the repository is there without a copy; what the box commits lands in its own dir;
- `packed-refs` is a snapshot of the repository's branches, tags and remote-tracking refs at
  `new` (not other boxes' `wtbox/*`), so `git log main`, `git diff main...` work as outside;
  `git fetch <repo> main` inside refreshes it (the repository is readable);
- its `config` is the repository's (remotes, filters), its hooks the repository's (read-only);
- HEAD is detached at the base commit; `git --git-dir <this> worktree add -b wtbox/<id>` makes
  the branch and the worktree's admin dir here.

The host never runs git as itself in a box-writable git dir: a box could set `core.fsmonitor`
(or a hook) there, and `git --git-dir=...` skips the ownership check (safe.directory) that
guards discovered repositories, so root would run the box's command. What the host needs of a
box's git runs inside the box through the launcher (`box_git`); the box's branch comes into the
repository with `fetch_back`, whose `git-upload-pack` runs inside the box as well: the host only
receives a pack, checked object by object (transfer.fsckObjects).

Chosen over a copy-on-write overlay of the repository's `.git` (measured in scripts/
bench_sandbox.py): no mount per box, no list of files git rewrites to copy up ahead of time with
the right owner (logs/HEAD, logs/refs/heads/wtbox/<id>, worktrees/<n>/*, objects/xx: each
missing one was a "Permission denied" on commit), and a repository that changes underneath is
read as git reads any alternate object store, not as an overlay lower dir modified while
mounted (undefined behaviour).
"""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from worktreebox.system import git

SKIPPED_REFS = "refs/heads/wtbox/"  # other boxes' branches stay theirs
SNAPSHOT_REFS = ("refs/heads", "refs/tags", "refs/remotes")  # what a box sees of the repository's refs
MAX_SYMREF_DEPTH = 5  # git's own limit
_OBJECT_ID = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # SHA-1, SHA-256


def common_dir(repo: Path) -> Path:
    """The repository's git dir (its `.git`, also when `repo` is one of its worktrees): a plain
    `.git` directory read as is (one git process less in every sandboxed `new`), else git says."""
    dot_git = repo / ".git"
    if dot_git.is_dir() and not dot_git.is_symlink() and (dot_git / "objects").is_dir():
        return dot_git.resolve()
    return Path(git.out(repo, "rev-parse", "--path-format=absolute", "--git-common-dir"))


def prepare(git_dir: Path, worktree: Path) -> None:
    """Every directory and file make() and worktree_add() write that no box or repository names, made
    empty ahead of the box (a spare sandbox's maker, providers/sandbox/spares.py): those two then
    only fill them. A new inode on this host's ext4 took ~0.27 ms of CPU (a directory ~0.5 ms) and
    a rewrite of an existing file ~0.05 ms: the git dir's 8 directories and 10 files were ~5 ms of
    every sandboxed `new`, on the checkout's thread, its critical path."""
    from worktreebox.box import branch_name

    admin = git_dir / "worktrees" / worktree.name
    branches = git_dir / "refs" / "heads" / branch_name("-").rsplit("/", 1)[0]
    for d in (git_dir / "objects" / "info", branches, git_dir / "info", admin, worktree):
        d.mkdir(parents=True, exist_ok=True)
    for f in (git_dir / "objects" / "info" / "alternates", git_dir / "HEAD", git_dir / "packed-refs",
              git_dir / "config", git_dir / "info" / "exclude", *(admin / n for n in ADMIN_FILES), worktree / ".git"):
        f.touch()


ADMIN_FILES = ("HEAD", "commondir", "gitdir")  # a worktree's admin dir, as worktree_add writes it


def make(repo: Path, git_dir: Path, base_sha: str, *, owner: tuple[int, int] | None = None) -> None:
    """Make the box's git dir (see the module docstring), or fill the one `prepare` made; `owner` (uid,
    gid) is given all of it."""
    common = common_dir(repo)
    (git_dir / "objects" / "info").mkdir(parents=True, exist_ok=True)
    (git_dir / "refs" / "heads").mkdir(parents=True, exist_ok=True)
    (git_dir / "objects" / "info" / "alternates").write_text(f"{common / 'objects'}\n")
    (git_dir / "HEAD").write_text(f"{base_sha}\n")
    (git_dir / "packed-refs").write_text(_refs_snapshot(repo, common))
    config = (common / "config").read_text()
    # the repository's hooks (read-only inside): a later value of a key wins, so appended is set
    (git_dir / "config").write_text(config + ("" if config.endswith("\n") or not config else "\n") +
                                    f"[core]\n\thooksPath = {_config_value(str(common / 'hooks'))}\n")
    (git_dir / "info").mkdir(exist_ok=True)
    (git_dir / "info" / "exclude").write_text(_exclude(common))
    if "worktree" in config:  # (rare: a repository whose work tree is set apart from its git dir)
        git.git(git_dir, "config", "--file", str(git_dir / "config"), "--unset-all", "core.worktree", check=False)
    if owner is not None:
        from worktreebox.system.users import give_tree

        give_tree(git_dir, *owner)


def _config_value(text: str) -> str:
    """A value as git's config file format quotes it (a path may hold spaces, quotes, backslashes)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# Bytecode beside a box's sources (a sandboxed box has no prefix, resources/caches.py; Python writes
# none there, `compileall` or an installer may) is never the box's work: `rm` would refuse it as
# unsaved, `status` would list it.
BYTECODE_EXCLUDES = "# wtbox: bytecode written in the box\n__pycache__/\n*.py[co]\n"


def _exclude(common: Path) -> str:
    """The repository's own info/exclude, then the bytecode Python writes in the box."""
    try:
        own = (common / "info" / "exclude").read_text()
    except OSError:
        own = ""
    return (own if not own or own.endswith("\n") else own + "\n") + BYTECODE_EXCLUDES


def _refs_snapshot(repo: Path, common: Path) -> str:
    """packed-refs lines for the repository's branches, tags and remote-tracking refs, as
    `git for-each-ref --format='%(objectname) %(refname)'` lists them, but not other boxes'."""
    refs = read_refs(common)
    if refs is None:  # a ref store the reader does not know, or one that changed while read: git says
        lines = git.out(repo, "for-each-ref", "--format=%(objectname) %(refname)", *SNAPSHOT_REFS).splitlines()
        refs = {name: sha for sha, name in (line.split(" ", 1) for line in lines)}
    return "".join(f"{sha} {name}\n" for name, sha in sorted(refs.items()) if not name.startswith(SKIPPED_REFS))


def read_refs(common: Path) -> dict[str, str] | None:
    """refname -> object id of SNAPSHOT_REFS, read from the files ref store (gitrepository-layout(5):
    `packed-refs`, then loose files under refs/ that override it; a symbolic ref as its target's
    object, as for-each-ref shows it): no git process (~2.5 ms of every sandboxed `new`, on its
    critical path). None when git must be asked: a reftable store, a file this reader does not
    understand, or packed-refs rewritten while the loose refs were read (a `git pack-refs` moves
    refs from one to the other)."""
    if (common / "reftable").exists():
        return None
    packed_file = common / "packed-refs"
    try:
        before = _identity(packed_file)
        refs = _packed(packed_file) if before is not None else {}
        symbolic: dict[str, str] = {}
        for top in SNAPSHOT_REFS:
            for root, dirs, files in os.walk(common / top):
                dirs.sort()
                for name in files:
                    if name.endswith(".lock"):
                        continue  # a ref being written: its old value is still in place
                    path = os.path.join(root, name)
                    text = Path(path).read_text().strip()
                    ref = os.path.relpath(path, common).replace(os.sep, "/")
                    if text.startswith("ref: "):
                        symbolic[ref] = text[5:].strip()
                    elif _OBJECT_ID.fullmatch(text):
                        refs[ref] = text
                    else:
                        return None
        if _identity(packed_file) != before:
            return None
    except (OSError, UnicodeError, ValueError):
        return None
    for ref, target in symbolic.items():  # (origin/HEAD -> origin/main); a dangling one is left out, as git does
        for _ in range(MAX_SYMREF_DEPTH):
            if target not in symbolic:
                break
            target = symbolic[target]
        if target in refs:
            refs[ref] = refs[target]
    return {name: sha for name, sha in refs.items() if name.startswith(tuple(f"{t}/" for t in SNAPSHOT_REFS))}


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _packed(path: Path) -> dict[str, str]:
    """packed-refs: a `# pack-refs with:` header, `<id> <refname>` lines, and `^<id>` lines that
    give the object an annotated tag above them points at (for-each-ref lists the tag's own id)."""
    refs = {}
    for line in path.read_text().splitlines():
        if not line or line.startswith(("#", "^")):
            continue
        sha, _, name = line.partition(" ")
        if not _OBJECT_ID.fullmatch(sha) or not name:
            raise ValueError(f"a packed-refs line this reader does not know: {line!r}")
        refs[name] = sha
    return refs


def worktree_add(git_dir: Path, worktree: Path, branch: str, sha: str) -> None:
    """The box's branch and worktree admin dir, in the box's git dir, as `git worktree add --no-checkout
    -b BRANCH WORKTREE SHA` leaves them (gitrepository-layout(5), "worktrees/"): written here, as make()
    writes the rest of this git dir; git's own command took ~8 ms of every sandboxed `new`. No index:
    the files and their index come from the tree's view (worktree.attach_view), or a checkout."""
    admin = git_dir / "worktrees" / worktree.name
    admin.mkdir(parents=True, exist_ok=True)  # (made ahead, empty, with a spare: `prepare`)
    ref = git_dir / "refs" / "heads" / branch
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(f"{sha}\n")
    (admin / "HEAD").write_text(f"ref: refs/heads/{branch}\n")
    (admin / "commondir").write_text("../..\n")
    (admin / "gitdir").write_text(f"{worktree / '.git'}\n")
    worktree.mkdir(parents=True, exist_ok=True)
    (worktree / ".git").write_text(f"gitdir: {admin}\n")


def box_git(launcher: list[str], *args: str) -> list[str]:
    """argv for a git command the host needs answered about a box (status, diff, log), run inside
    the box as its user. `launcher` is the sandbox's prefix for the box's worktree."""
    return [*launcher, "git", *args]


def fetch_back(repo: Path, git_dir: Path, branch: str, launcher: list[str], *, extra: tuple[str, ...] = ()) -> None:
    """Bring the box's branch into the repository (`rm`'s unsaved-work check, pick, keep-branch).
    `launcher`: the sandbox's prefix (any cwd); git-upload-pack runs inside the box."""
    from worktreebox.errors import WtboxError

    upload_pack = shlex.join([*launcher, "git-upload-pack"])
    proc = git.git(repo, "-c", "transfer.fsckObjects=true", "fetch", "--quiet", "--no-tags", "--no-write-fetch-head",
                   *extra, "--upload-pack", upload_pack, str(git_dir), f"+refs/heads/{branch}:refs/heads/{branch}",
                   check=False)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise WtboxError(f"Could not bring branch {branch} back from its box into {repo}: {why}.")
