"""worktreebox: many isolated, disposable development boxes on one Linux host."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Box", "Host", "WtboxError", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import worktreebox` (and `wtbox ls`) stays cheap.
    if name == "Host":
        from worktreebox.host import Host

        return Host
    if name == "Box":
        from worktreebox.box import Box

        return Box
    if name == "WtboxError":
        from worktreebox.errors import WtboxError

        return WtboxError
    raise AttributeError(name)
