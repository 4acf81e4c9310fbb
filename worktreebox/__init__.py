"""worktreebox: many isolated, disposable development boxes on one Linux host."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Host", "Box", "WtboxError", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import worktreebox` (and `wtbox ls`) stays cheap.
    if name == "Host":
        from .host import Host

        return Host
    if name == "Box":
        from .box import Box

        return Box
    if name == "WtboxError":
        from .errors import WtboxError

        return WtboxError
    raise AttributeError(name)
