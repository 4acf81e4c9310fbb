"""Compose's variable interpolation, as the Compose specification defines it ("Interpolation").

`$VAR` and `${VAR}`; `${VAR:-default}` (unset or empty) and `${VAR-default}` (unset);
`${VAR:?err}` and `${VAR?err}` (required); `${VAR:+alt}` and `${VAR+alt}` (alternative); nested
expressions in the word (`${A:-${B:-x}}`); `$$` for a literal `$`; anything else after `$` is kept
as written. Variables come from the project's `.env` only: `wtbox init` must not bake the shell
of whoever runs it into a file the team commits. What was unset or required is reported, and
an unset variable becomes the empty string, as Compose does.
"""
from __future__ import annotations

import re

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPS = (":-", ":?", ":+", "-", "?", "+")


class Interpolation:
    def __init__(self, variables: dict[str, str]) -> None:
        self.variables = variables
        self.unset: list[str] = []  # names used without a value or default
        self.required: list[str] = []  # "${VAR:?msg}" whose VAR was unset: "VAR (msg)"

    def __call__(self, text: str) -> str:
        return self._scan(text, 0, stop=None)[0]

    def _scan(self, text: str, i: int, stop: str | None) -> tuple[str, int]:
        """Interpolate from i until `stop` (a closing brace of a nested word) or the end."""
        out: list[str] = []
        while i < len(text):
            ch = text[i]
            if stop is not None and ch == stop:
                return "".join(out), i
            if ch != "$":
                out.append(ch)
                i += 1
                continue
            nxt = text[i + 1:i + 2]
            if nxt == "$":
                out.append("$")
                i += 2
            elif nxt == "{":
                value, i = self._braced(text, i + 2)
                out.append(value)
            elif (m := _NAME.match(text, i + 1)) is not None:
                out.append(self._lookup(m.group(0)))
                i = m.end()
            else:
                out.append("$")
                i += 1
        return "".join(out), i

    def _braced(self, text: str, i: int) -> tuple[str, int]:
        m = _NAME.match(text, i)
        if m is None:  # not a variable: kept as written
            close = text.find("}", i)
            close = len(text) - 1 if close < 0 else close
            return text[i - 2:close + 1], close + 1
        name, i = m.group(0), m.end()
        op = next((o for o in _OPS if text.startswith(o, i)), None)
        word = ""
        if op is not None:
            word, i = self._scan(text, i + len(op), stop="}")
        i = i + 1 if i < len(text) and text[i] == "}" else i
        return self._apply(name, op, word), i

    def _apply(self, name: str, op: str | None, word: str) -> str:
        value = self.variables.get(name)
        empty = not value
        if op in (":-", "-"):
            return word if (value is None or (op == ":-" and empty)) else value
        if op in (":+", "+"):
            return word if (value is not None and not (op == ":+" and empty)) else ""
        if op in (":?", "?") and (value is None or (op == ":?" and empty)):
            self.required.append(f"{name} ({word})" if word else name)
            return ""
        return self._lookup(name) if op is None else value or ""

    def _lookup(self, name: str) -> str:
        if name not in self.variables:
            if name not in self.unset:
                self.unset.append(name)
            return ""
        return self.variables[name]


def interpolate_tree(node: object, interp: Interpolation) -> object:
    """Every string value of a parsed YAML document interpolated (keys are not, as in Compose)."""
    if isinstance(node, str):
        return interp(node)
    if isinstance(node, dict):
        return {k: interpolate_tree(v, interp) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(v, interp) for v in node]
    return node
