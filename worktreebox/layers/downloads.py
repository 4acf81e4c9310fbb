"""Host-wide download caches under $WTBOX_HOME/downloads/, shared by every box and layer build.

What a package manager *downloads* (wheels, tarballs, crates) is keyed by content and safe to
share, and sharing it is what keeps the hundredth box from fetching the same wheel a hundredth
time. What a box *builds* stays its own: XDG_CACHE_HOME, TMPDIR and build outputs are per box
(resources/caches.py). Without these variables pip and uv would follow the box's XDG_CACHE_HOME
into a per-box cache.
"""
from __future__ import annotations

import os
from pathlib import Path

# variable -> directory under downloads/
CACHES = {
    "PIP_CACHE_DIR": "pip",
    "UV_CACHE_DIR": "uv",
    "npm_config_cache": "npm",
    "YARN_CACHE_FOLDER": "yarn",
    "npm_config_store_dir": "pnpm-store",  # pnpm's content-addressed store
    "CARGO_HOME": "cargo",  # its registry/ and git/ are the download cache; see _cargo_home
}
# What a user keeps in their own CARGO_HOME besides downloads: linked in, so cargo in a box
# still reads their config and finds the tools they installed.
_CARGO_OWN = ("bin", "config.toml", "config", "credentials.toml", "credentials", "env")


def root(home: Path) -> Path:
    return Path(home) / "downloads"


def env(home: Path) -> dict[str, str]:
    """The variables that point every package manager's download cache at the host-wide one."""
    base = root(home)
    if not (base / "cargo").is_dir():
        _prepare(base)
    return {var: str(base / sub) for var, sub in CACHES.items()}


def _prepare(base: Path) -> None:
    for sub in CACHES.values():
        (base / sub).mkdir(parents=True, exist_ok=True)
    own = Path(os.environ.get("CARGO_HOME") or Path.home() / ".cargo")
    for name in _CARGO_OWN:
        link = base / "cargo" / name
        if (own / name).exists() and not link.exists() and own.resolve() != (base / "cargo").resolve():
            try:
                link.symlink_to(own / name)
            except FileExistsError:
                pass
