"""The box env as text: rendering it as sh, dotenv or JSON, and reading the dotenv file back."""
from __future__ import annotations

import json
import shlex
from pathlib import Path


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


def read_env_file(path: Path) -> dict[str, str]:
    """The box env file as `format_env(..., "dotenv")` writes it (KEY=VALUE or KEY="escaped")."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, val = line.removeprefix("export ").partition("=")
        if len(val) >= 2 and val[0] == val[-1] == '"':
            val = _unescape(val[1:-1])
        elif len(val) >= 2 and val[0] == val[-1] == "'":
            val = val[1:-1]
        out[key.strip()] = val
    return out


def _unescape(s: str) -> str:
    """Undo format_env's dotenv escapes (backslash, quote, newline, dollar)."""
    out, i = [], 0
    while i < len(s):
        ch = s[i]
        if ch == "\\" and i + 1 < len(s):
            nxt = s[i + 1]
            out.append({"n": "\n", "t": "\t"}.get(nxt, nxt))
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)
