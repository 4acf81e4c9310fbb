"""Rendering a box env as sh, dotenv or JSON."""
from __future__ import annotations

import json
import shlex


def format_env(env: dict[str, str], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(env, indent=2, sort_keys=True) + "\n"
    if fmt == "sh":
        return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(env.items()))
    # dotenv: double-quoted, escapes for the characters dotenv parsers understand
    lines = []
    for k, v in sorted(env.items()):
        if v and all(ch.isalnum() or ch in "-_./:@%+,=" for ch in v):
            lines.append(f"{k}={v}\n")
        else:
            esc = v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("$", "\\$")
            lines.append(f'{k}="{esc}"\n')
    return "".join(lines)
