"""Keeping secret values out of output: masking env vars and URLs, redacting text."""
from __future__ import annotations

import re

MASK = "***"
# Env names whose values are secret even though they are written to the 0600 env file.
_SECRET_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN|API_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)
_URL_PASSWORD = re.compile(r"^([a-z][a-z0-9+.-]*://[^:/@]*:)([^@]*)(@)", re.I)
_URL_PASSWORD_ANYWHERE = re.compile(r"([a-z][a-z0-9+.-]*://[^:/@\s]*:)([^@\s]*)(@)", re.I)


def looks_secret(name: str) -> bool:
    """A variable name whose value is a secret (PASSWORD, TOKEN, API_KEY, ...)."""
    return bool(_SECRET_NAME.search(name))


def has_url_password(value: str) -> bool:
    """A value that is a URL with a password in it (scheme://user:password@host)."""
    m = _URL_PASSWORD.match(value)
    return bool(m and m.group(2))


def mask_url(url: str) -> str:
    return _URL_PASSWORD.sub(lambda m: m.group(1) + MASK + m.group(3), url or "")


def mask_urls_in(text: str) -> str:
    """Every URL password in free text (a traceback, an exception's message) as ***."""
    return _URL_PASSWORD_ANYWHERE.sub(lambda m: m.group(1) + MASK + m.group(3), text)


def mask_env(env: dict[str, str]) -> dict[str, str]:
    out = {}
    for k, v in env.items():
        if _SECRET_NAME.search(k):
            out[k] = MASK
        elif "://" in v:
            out[k] = mask_url(v)
        else:
            out[k] = v
    return out


class Redactor:
    """Replaces every occurrence of any secret value in text by ***."""

    def __init__(self, values: list[str] | tuple[str, ...] = ()) -> None:
        vals = sorted({v for v in values if v and len(v) >= 3}, key=len, reverse=True)
        self._re = re.compile("|".join(re.escape(v) for v in vals)) if vals else None

    def __call__(self, text: str) -> str:
        return self._re.sub(MASK, text) if self._re else text

    def __bool__(self) -> bool:
        return self._re is not None


def secret_values(env: dict[str, str]) -> list[str]:
    """Values in an env that must never appear in logs: passwords, tokens, URL passwords."""
    out = []
    for k, v in env.items():
        if _SECRET_NAME.search(k):
            out.append(v)
        m = _URL_PASSWORD.match(v)
        if m:
            out.append(m.group(2))
    return [v for v in out if v]
