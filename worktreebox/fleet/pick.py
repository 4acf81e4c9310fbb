"""`wtbox pick`: keep one attempt of a fan-out, remove the others without losing work."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from worktreebox.errors import WtboxError
from worktreebox.fleet.compare import KEY
from worktreebox.system import git

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.context import HostContext


def pick_plan(host: HostContext, ref: str | None) -> tuple[Box, list[Box]]:
    """The chosen box and the other live boxes of its fan-out."""
    box = host.get(ref)
    fid = (box.data.get(KEY) or {}).get("id")
    others = [b for b in host.list() if fid and (b.data.get(KEY) or {}).get("id") == fid and b.id != box.id]
    return box, others


def pick(host: HostContext, box: Box, others: list[Box], merge_into: str | None = None, push: bool = False,
         remote: str = "origin", note: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Keep `box` (merge/push first: if that fails nothing is removed), then remove the others.

    Nothing is lost: what a removed attempt left uncommitted is committed to its branch first,
    and a branch holding commits no other branch has is kept.
    """
    note = note or (lambda m: None)
    out: dict[str, Any] = {"kept": box.id, "branch": box.branch, "merged_into": None, "pushed": None,
                           "removed": [], "kept_branches": [], "failed": []}
    if merge_into or push:
        from worktreebox.providers import sandbox

        host.launcher(box)  # a holder a reboot took is made again
        sandbox.bring_back(box)  # a sandboxed box's commits come into the repository first
    if merge_into:
        out["merged_into"] = git.merge_branch(box.repo, box.path, box.branch, merge_into)
        note(f"merged {box.branch} into {merge_into}")
    if push:
        target = merge_into or box.branch
        proc = git.git(box.repo, "push", "--quiet", remote, f"refs/heads/{target}:refs/heads/{target}", check=False)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            raise WtboxError(f"Pushing {target} to {remote} failed ({lines[-1] if lines else proc.returncode}); "
                             "nothing was removed.")
        out["pushed"] = f"{remote}/{target}"
        note(f"pushed {target} to {remote}")
    box.keep = True
    box.data.setdefault(KEY, {})["picked"] = True
    host.registry.save_box(box)
    for b in others:
        try:
            git.save_work(b.path, f"wtbox pick: save the uncommitted work of {b.id} before removing it", label=b.id,
                          launcher=host.launcher(b))
            keep_branch = host.unsaved_work(b) is not None
            host.rm(b, force=True, keep_branch=keep_branch)
        except WtboxError as e:
            out["failed"].append({"box": b.id, "error": str(e)})
            note(f"could not remove {b.id}: {e}")
            continue
        out["removed"].append(b.id)
        if keep_branch:
            out["kept_branches"].append(b.branch)
        note(f"removed {b.id}" + (f" (kept its branch {b.branch}: it has commits no other branch has)"
                                  if keep_branch else ""))
    return out
