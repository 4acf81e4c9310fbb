"""Finding the shipped folders `observability/` and `templates/` from a wheel or a checkout."""
from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parents[1]  # the worktreebox package
# Where `python -m worktreebox...` finds this very package (the cwd of the processes wtbox starts).
PACKAGE_PARENT = _PKG.parent
# Installed: hatch force-includes the folders under worktreebox/_assets/. Checkout: the repo root.
_BASES = (_PKG / "_assets", _PKG.parent)


def asset_path(rel: str) -> Path:
    """Path of a shipped file such as "observability/metrics.toml" or "templates/env.j2"."""
    for base in _BASES:
        p = base / rel
        if p.exists():
            return p
    from worktreebox.errors import WtboxError

    raise WtboxError(f"The packaged file {rel} is missing (looked in {_BASES[0]} and {_BASES[1]}); "
                     "reinstall worktreebox.")
