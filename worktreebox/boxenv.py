"""The one definition of the environment a box's processes run with.

Services (through the supervisor), `[setup] cmd`, `[database] migrate`, `wtbox exec`/`shell`
and fan-out runs all start from the same thing: the caller's environment minus the variables
that tie a process to some other box, then the box env, then per-process layers (a service's
own env, `--secret` values), and always WTBOX_ID=<this box>.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from .box import Box


def _other_box_var(name: str) -> bool:
    """Variables that tie a process to a box: a `wtbox new` run inside box A must not make B's processes A's."""
    return name in ("WTBOX_ID", "WTBOX_BOX_DIR", "WTBOX_SHELL", "WTBOX_METRICS_URL") or name.startswith("WTBOX_PORT_")


def without_box_vars(parent: Mapping[str, str] | None = None) -> dict[str, str]:
    """`parent` (default os.environ) without the variables that tie a process to a box: for
    host-level helpers (the pool's filler) that must never count as some box's process."""
    return {k: v for k, v in (os.environ if parent is None else parent).items() if not _other_box_var(k)}


def compose(box_id: str, *layers: Mapping[str, str] | None, parent: Mapping[str, str] | None = None) -> dict[str, str]:
    """`parent` (default os.environ) without another box's ids, each layer over it in order, WTBOX_ID last."""
    env = without_box_vars(parent)
    for layer in layers:
        env.update(layer or {})
    env["WTBOX_ID"] = box_id
    return env


def process_env(box: "Box", secrets: Mapping[str, str] | None = None) -> dict[str, str]:
    """What a process of the box runs with: the caller's env (minus another box's ids), the box env, secrets."""
    return compose(box.id, box.env, secrets)


def redactor_for(box: "Box", secrets: Mapping[str, str]):
    """Hides the `--secret` values and the secret values of the box env (passwords, tokens, URL passwords)."""
    from .secrets import Redactor, secret_values

    return Redactor(list(secrets.values()) + secret_values(box.env))
