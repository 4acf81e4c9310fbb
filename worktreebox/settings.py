"""Where the default wtbox home and the user's state directory are.

Standard library `os` only: the `wtbox` launcher (launcher.py) resolves the home with it
before deciding whether a CLI server answers, so importing it must cost nothing.
"""
from __future__ import annotations

import os


def user_state_dir() -> str:
    """The user's state directory ($XDG_STATE_HOME, else ~/.local/state): where the default home
    and the per-user fallbacks of the host-wide directories live."""
    return os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")


def default_home() -> str:
    """$WTBOX_HOME, else <user state dir>/wtbox."""
    if os.environ.get("WTBOX_HOME"):
        return os.path.expanduser(os.environ["WTBOX_HOME"])
    return os.path.join(user_state_dir(), "wtbox")


def kill_wait() -> float:
    """WTBOX_KILL_WAIT (default 5): the seconds a stopped process gets between SIGTERM and SIGKILL,
    and then to be gone. Read when used: a CLI server serves callers with their own environment."""
    try:
        wait = float(os.environ.get("WTBOX_KILL_WAIT") or 5.0)
    except ValueError:
        return 5.0
    return wait if wait >= 0 else 5.0
