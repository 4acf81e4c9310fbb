"""The one definition of the environment a box's processes run with, decided when the box is made.

Services (through the supervisor), `[setup] cmd`, `[database] migrate`, `wtbox exec`/`shell`
and fan-out runs all start from the same thing: what the box inherited when `new` made it,
then the box env, then per-process layers (a service's own env, `--secret` values), and
always WTBOX_ID=<this box>.

Inheriting the environment of whoever ran `new`/`up`/`restart` made the same box behave
differently from two shells (another PATH found another python3). So `new` captures the
variables a box inherits and records them in the box's registry row, and every later start
uses that record, whatever the caller's environment. What is inherited: a short list a program
needs to run as the user (PATH, HOME, locale, ...) plus `[box] inherit_env` (names, or prefixes
ending in `*`); with `[box] clean_env = true` only what `inherit_env` names. A name that looks
like a secret is never captured (those go through `--secret`, memory only).
"""
from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.config.load import BoxConfig

DEFAULT_INHERIT = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "LC_*", "TZ", "TERM")
# How the host reaches the network: its CAs and proxies. A host whose HTTPS goes through its own CA
# needs these in a box too, or `uv sync` in [setup] fails ("invalid peer certificate: UnknownIssuer").
NETWORK_INHERIT = ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
                   "PIP_CERT", "GIT_SSL_CAINFO", "AWS_CA_BUNDLE", "HTTPLIB2_CA_CERTS", "NIX_SSL_CERT_FILE",
                   "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", "CLOUDSDK_CORE_CUSTOM_CA_CERTS_FILE", "UV_NATIVE_TLS",
                   "http_proxy", "https_proxy", "ftp_proxy", "all_proxy", "no_proxy",
                   "HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "ALL_PROXY", "NO_PROXY")
DATA_KEY = "inherited_env"
# The OpenTelemetry SDK variables a box with an OTLP endpoint sets (resources/traces.py).
OTEL_ENDPOINT, OTEL_PROTOCOL, OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES")
OTEL_VARS = (OTEL_ENDPOINT, OTEL_PROTOCOL, OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES)
EXEC_SERVICE = "exec"  # OTEL_SERVICE_NAME of exec, shell, setup, migrate and fan-out runs


def _other_box_var(name: str) -> bool:
    """Variables that tie a process to a box: a `wtbox new` run inside box A must not make B's processes A's."""
    return name in ("WTBOX_ID", "WTBOX_BOX_DIR", "WTBOX_SHELL", "WTBOX_METRICS_URL", "WTBOX_CDP_URL",
                    "WTBOX_BOX_SOCKET") \
        or (name.startswith("WTBOX_PORT_") and name != "WTBOX_PORT_RANGE")  # the range is a host setting


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


def patterns(cfg: BoxConfig) -> list[str]:
    """The names and prefixes a box inherits under its [box] config."""
    return list(cfg.inherit_env) if cfg.clean_env else [*DEFAULT_INHERIT, *NETWORK_INHERIT, *cfg.inherit_env]


def _inheritable(cfg: BoxConfig, environ: Mapping[str, str] | None) -> dict[str, str]:
    """The variables of `environ` a box inherits under its config: secret-looking names and box ids aside."""
    from worktreebox.secrets import looks_secret

    environ = os.environ if environ is None else environ
    pats = patterns(cfg)
    return {k: v for k, v in sorted(environ.items())
            if any(fnmatch.fnmatchcase(k, p) for p in pats) and not _other_box_var(k) and not looks_secret(k)}


def capture(cfg: BoxConfig, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """What a new box inherits from `environ` (the creating process's) and records in its row."""
    from worktreebox.secrets import has_url_password

    return {k: v for k, v in _inheritable(cfg, environ).items() if not has_url_password(v)}


def inherited_secrets(cfg: BoxConfig, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Inherited variables whose value carries a password (HTTPS_PROXY=http://user:pw@proxy:3128):
    the box gets them as it gets --secret values, held in its supervisor's memory, the name alone
    recorded; the registry is a file, and no secret is written to disk."""
    from worktreebox.secrets import has_url_password

    return {k: v for k, v in _inheritable(cfg, environ).items() if has_url_password(v)}


# What wtbox fixes so that the same inputs give the same box (README, "Reproducible boxes"): hash
# order, time zone, locale; SOURCE_DATE_EPOCH (the commit's time) for tools that stamp builds.
# A [box] env entry wins, and so does a variable [box] inherit_env names by its full name.
DETERMINISTIC = {"PYTHONHASHSEED": "0", "TZ": "UTC", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
SOURCE_DATE_EPOCH = "SOURCE_DATE_EPOCH"
# A service's output goes to a file, not a terminal, and Python then buffers print() up to 8 KB:
# `wtbox logs` would show a quiet service's lines only at its exit (Heroku and honcho users set
# the same). Other runtimes flush per line or per write on their own.
LOGS_AS_WRITTEN = {"PYTHONUNBUFFERED": "1"}


def deterministic(cfg: BoxConfig, commit_time: int | None) -> dict[str, str]:
    """The runtime defaults a new box gets, less what its config sets or inherits by name."""
    out = {**DETERMINISTIC, **LOGS_AS_WRITTEN}
    if commit_time is not None:
        out[SOURCE_DATE_EPOCH] = str(commit_time)
    return {k: v for k, v in out.items() if k not in cfg.env and k not in cfg.inherit_env}


def process_env(box: Box, secrets: Mapping[str, str] | None = None) -> dict[str, str]:
    """What a process of the box runs with: what it inherited at creation, the box env, secrets.
    A box made before environments were recorded falls back to the caller's environment."""
    return compose(box.id, box.env, otel_service_name(box.env, {}, EXEC_SERVICE), secrets,
                   parent=box.data.get(DATA_KEY))


def otel_service_name(box_env: Mapping[str, str], own_env: Mapping[str, str], service: str) -> dict[str, str]:
    """OTEL_SERVICE_NAME=<service> for a process of a box with an OTLP endpoint, unless the repo's
    [box] env or the process's own env names one."""
    if OTEL_ENDPOINT in box_env and OTEL_SERVICE_NAME not in box_env and OTEL_SERVICE_NAME not in own_env:
        return {OTEL_SERVICE_NAME: service}
    return {}


def renamed_otel_box(env: Mapping[str, str], old_id: str, new_id: str) -> dict[str, str]:
    """OTEL_RESOURCE_ATTRIBUTES naming the box by its new id (a box claimed from the pool)."""
    attrs = env.get(OTEL_RESOURCE_ATTRIBUTES, "")
    old = f"wtbox.box={old_id}"
    if old in attrs.split(","):
        return {OTEL_RESOURCE_ATTRIBUTES: ",".join(f"wtbox.box={new_id}" if a == old else a for a in attrs.split(","))}
    return {}


def redactor_for(box: Box, secrets: Mapping[str, str]):
    """Hides the `--secret` values and the secret values of the box env (passwords, tokens, URL passwords)."""
    from worktreebox.secrets import Redactor, secret_values

    return Redactor(list(secrets.values()) + secret_values(box.env))
