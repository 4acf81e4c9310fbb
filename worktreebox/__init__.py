"""worktreebox: many isolated, disposable development boxes on one Linux host."""
from __future__ import annotations

# Nothing is imported here: the `wtbox` launcher is imported through this package before it can
# catch Ctrl-C, and an import here was that window (tests/test_new_user.py saw a traceback from it).
__all__ = ["Box", "Host", "WtboxError", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import worktreebox` (and `wtbox ls`) stays cheap.
    if name == "__version__":
        from worktreebox.version import __version__

        return __version__
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
