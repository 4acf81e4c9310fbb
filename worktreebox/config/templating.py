"""The one Jinja2 renderer: box facts into wtbox.toml strings and into shipped templates.

StrictUndefined everywhere: a missing fact is a config error naming where it was used,
never a silently empty string. Templates come from a repository's wtbox.toml, which whoever
works in a box can edit: they render in Jinja2's SandboxedEnvironment, where
`{{ lipsum.__globals__['os'].popen('id').read() }}` is a SecurityError (a config error here),
not a command run by wtbox at `new`.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from worktreebox.errors import ConfigError


@lru_cache(maxsize=1)
def _environment() -> Any:
    import jinja2  # ~30 ms: only when something is templated
    from jinja2.sandbox import SandboxedEnvironment

    return SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)


def render(template: str, facts: dict[str, Any], where: str) -> str:
    """Render one template string over `facts`; errors are a ConfigError naming `where` (file and key)."""
    if "{{" not in template and "{%" not in template:
        return template
    import jinja2

    try:
        text: str = _environment().from_string(template).render(**facts)
        return text
    except jinja2.UndefinedError as e:
        raise ConfigError(f"{where}: {e.message} (available: {', '.join(sorted(facts))}).") from None
    except jinja2.sandbox.SecurityError as e:
        raise ConfigError(f"{where}: the template reaches for what templates may not ({e}).") from None
    except jinja2.TemplateError as e:  # its str() adds lines of location and source: one line here
        raise ConfigError(f"{where}: bad template {template!r}: {e.message or type(e).__name__}.") from None
    except (ArithmeticError, LookupError, TypeError, ValueError, RecursionError) as e:
        # what the template's own expressions raise (1 / 0, 'a' + 1, an include with no loader, a
        # macro calling itself): the template's fault, so a config error, not an internal one
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{where}: template {template!r} failed: {detail}.") from None


# Text with only `{{ name.name }}` substitutions: valid Jinja2 by construction, so reading a config
# made only of these (the usual case) needs no Jinja2 import (~20 ms of every claim from the pool).
_PLAIN = re.compile(r"(?:[^{}]|\{(?![{%#])|\}(?!\})|\{\{\s*[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*\s*\}\})*")


def check(template: str, where: str) -> None:
    """Refuse a template that cannot compile (a syntax error, an unknown filter) when the config
    is read, not half-way through making a box."""
    problem = compile_error(template)
    if problem:
        raise ConfigError(f"{where}: {problem}.")


def compile_error(template: str) -> str | None:
    """Why `template` cannot compile ("bad template '...': ..."), or None when it can."""
    if "{{" not in template and "{%" not in template and "{#" not in template:
        return None
    if _PLAIN.fullmatch(template):
        return None
    import jinja2

    try:
        _environment().compile(template)
    except jinja2.TemplateError as e:
        return f"bad template {template!r}: {e.message or type(e).__name__}"
    return None


def render_file(path: Any, facts: dict[str, Any]) -> str:
    """Render a template file (a shipped asset) over `facts`; errors name the file."""
    from pathlib import Path

    return render(Path(path).read_text(), facts, str(path))
