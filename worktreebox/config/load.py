"""Load wtbox.toml (per repo) and config.toml (per host): which files, read how.

A config error names the file, the key and what was expected, and exits 2. The schemas and
their dataclasses are repo.py and host.py, the value parsers values.py; their names are also
importable from here, where the rest of wtbox has always found them.
"""
from __future__ import annotations

from pathlib import Path

from worktreebox import diagnostics
from worktreebox.config.host import HostConfig, parse_host_config
from worktreebox.config.repo import (
    OWN_PORTS,
    BoxConfig,
    DepsConfig,
    LimitsConfig,
    RepoConfig,
    parse_repo_config,
    services_in_order,
)
from worktreebox.config.schema import loads
from worktreebox.config.values import UNLIMITED, check_ready, parse_duration, path_inside
from worktreebox.errors import ConfigError

__all__ = [  # what other modules import from here
    "OWN_PORTS", "UNLIMITED", "BoxConfig", "ConfigError", "DepsConfig", "HostConfig", "LimitsConfig", "RepoConfig",
    "check_ready", "config_sources", "load_config_for_new", "load_host_config", "load_repo_config_file",
    "parse_duration", "parse_repo_config", "path_inside", "services_in_order",
]
log = diagnostics.logger("config")


def load_host_config(home: Path) -> HostConfig:
    """$WTBOX_HOME/config.toml (all optional) with this environment's WTBOX_* overrides."""
    path = home / "config.toml"
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        text = ""
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} cannot be read as UTF-8 TOML: {e}.") from None
    log.debug("host config: %s%s", path, "" if text else " (none: the defaults)")
    return parse_host_config(loads(text, str(path)), str(path))


def load_repo_config_file(root: Path, source_label: str | None = None) -> RepoConfig:
    """The wtbox.toml (or Procfile) in a checkout; the defaults when neither exists."""
    toml = root / "wtbox.toml"
    return parse_repo_config(_read(toml), source_label or str(toml), procfile=_read(root / "Procfile"))


def config_sources(repo: Path, sha: str, *, explicit_ref: bool) -> tuple[str, str | None, str | None]:
    """(source label, wtbox.toml text, Procfile text) a `new` at `sha` reads: without --from, the
    files in the main checkout as the user sees them (so edits apply before they are committed);
    with --from, the files at that ref."""
    from worktreebox.system import git

    if not explicit_ref:
        return str(repo / "wtbox.toml"), _read(repo / "wtbox.toml"), _read(repo / "Procfile")
    return f"wtbox.toml at {sha[:12]}", git.show_file(repo, sha, "wtbox.toml"), git.show_file(repo, sha, "Procfile")


def load_config_for_new(repo: Path, sha: str, *, explicit_ref: bool) -> RepoConfig:
    """The config a `new` at `sha` uses (config_sources says which files)."""
    source, text, procfile = config_sources(repo, sha, explicit_ref=explicit_ref)
    return parse_repo_config(text, source, procfile=procfile)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} cannot be read: {e}.") from None
