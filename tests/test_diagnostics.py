"""worktreebox/diagnostics.py: the `wtbox` loggers (-v, WTBOX_DEBUG) and the crash log an internal
error writes, through a real `wtbox` process and the MCP server, with no secret in either."""
from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys

import anyio
import pytest

from worktreebox import diagnostics

PASSWORD = "pw-9f3c1e77"  # in a URL
TOKEN = "tok-5d2a8b40"  # in a variable named like a secret
PLAIN_NAMED = "val-77e01c3a"  # in a variable only --secret says is secret
FILE_SECRET = "file-2c9d4e61"  # in a file given as --secret NAME=@FILE
SECRETS = (PASSWORD, TOKEN, PLAIN_NAMED, FILE_SECRET)

# A real `wtbox new` whose operation fails with a bug that quotes every secret.
DRIVER = r"""
import os, sys
import worktreebox.fleet.pool as pool

secret_file = sys.argv[1]

def boom(*args, **kwargs):
    raise RuntimeError("boom: postgresql://app:%s@db/x %s %s %s" % (
        os.environ["PW"], os.environ["MY_API_TOKEN"], os.environ["STRIPE_KEY"], open(secret_file).read().strip()))

pool.new_box = boom
sys.argv = ["wtbox", "new", "t", "--secret", "STRIPE_KEY", "--secret=FILE_KEY=@" + secret_file, "--repo", "/nowhere"]
from worktreebox.cli.main import run
run()
"""


@pytest.fixture
def secret_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PW", PASSWORD)
    monkeypatch.setenv("MY_API_TOKEN", TOKEN)
    monkeypatch.setenv("STRIPE_KEY", PLAIN_NAMED)
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text(FILE_SECRET + "\n")
    return secret_file


def crash(home, secret_file, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DRIVER, str(secret_file)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "WTBOX_HOME": str(home), "WTBOX_NO_AUTO_GC": "1", **env})


def test_an_internal_error_is_one_sentence_naming_its_crash_log(wtbox_home, secret_env):
    proc = crash(wtbox_home, secret_env)
    log = wtbox_home / "wtbox.log"
    assert proc.returncode == 1
    assert proc.stderr == ("wtbox: internal error: RuntimeError: boom: postgresql://app:***@db/x *** *** *** "
                           f"(details in {log}).\n")
    text = log.read_text()
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    for line in ("### version information", "wtbox: 0.1.0", f"python: {sys.version.split()[0]} ({sys.executable})",
                 "platform: Linux-", "### error information",
                 f"command: wtbox new t --secret STRIPE_KEY --secret=FILE_KEY=@{secret_env} --repo /nowhere",
                 "error: RuntimeError: boom: postgresql://app:***@db/x *** *** ***",
                 "Traceback (most recent call last):", "in boom"):
        assert line in text, line
    for secret in SECRETS:
        assert secret not in text and secret not in proc.stderr


def test_with_debugging_the_traceback_shows_too(wtbox_home, secret_env):
    proc = crash(wtbox_home, secret_env, WTBOX_DEBUG="1")
    assert proc.returncode == 1
    assert "Traceback (most recent call last):" in proc.stderr and "RuntimeError: boom" in proc.stderr
    assert "RuntimeError: boom" in (wtbox_home / "wtbox.log").read_text()


def test_a_home_that_cannot_hold_the_log_still_gets_one_sentence(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("WTBOX_HOME", str(tmp_path / "file" / "home"))
    msg = diagnostics.internal_error(KeyError("x"), ["wtbox", "ls"])
    assert msg == "internal error: KeyError: 'x' (set WTBOX_DEBUG=1 for a traceback)."


def test_the_mcp_server_answers_a_bug_with_the_same_sentence(wtbox_home, secret_env, monkeypatch):
    from worktreebox.host import Host
    from worktreebox.mcp import server

    def boom(*args):
        raise RuntimeError(f"listing failed: {os.environ['MY_API_TOKEN']}")

    monkeypatch.setattr(Host, "list", boom)
    result = anyio.run(server.build_server().call_tool, "box_list", {})
    assert result.is_error
    assert result.content[0].text == (f"internal error: RuntimeError: listing failed: *** "
                                      f"(details in {wtbox_home / 'wtbox.log'}).")
    text = (wtbox_home / "wtbox.log").read_text()
    assert "command: wtbox mcp box_list {}" in text and "Traceback" in text and TOKEN not in text


@pytest.mark.parametrize(("argv", "shown"), [
    (["wtbox", "new", "t", "--secret", "NAME"], "wtbox new t --secret NAME"),
    (["wtbox", "new", "t", "--secret", "NAME=inline"], "wtbox new t --secret NAME=***"),
    (["wtbox", "new", "t", "--secret=NAME=inline"], "wtbox new t --secret=NAME=***"),
    (["wtbox", "new", "t", "--secret", "NAME=@/run/key"], "wtbox new t --secret NAME=@/run/key"),
    (["wtbox", "db", "x", "postgresql://u:pw@h/db"], "wtbox db x postgresql://u:***@h/db"),
])
def test_the_command_line_is_masked(argv, shown):
    assert " ".join(diagnostics.masked_command(argv)) == shown


@pytest.mark.parametrize(("verbose", "debug_env", "debug"), [
    (False, None, False), (True, None, True), (False, "1", True), (False, "0", False),
])
def test_debug_lines_with_v_or_wtbox_debug(monkeypatch, capsys, verbose, debug_env, debug):
    if debug_env is None:
        monkeypatch.delenv("WTBOX_DEBUG", raising=False)
    else:
        monkeypatch.setenv("WTBOX_DEBUG", debug_env)
    diagnostics.configure(verbose=verbose)
    log = diagnostics.logger("test")
    log.debug("a debug line %s", 1)
    log.warning("a warning")
    err = capsys.readouterr().err
    assert diagnostics.debugging() == debug
    assert ("wtbox.test DEBUG a debug line 1" in err) == debug
    assert "wtbox.test WARNING a warning" in err
    assert logging.getLogger("wtbox").level == (logging.DEBUG if debug else logging.WARNING)


def test_a_command_that_logs_nothing_never_imports_logging(wtbox_home):
    """`logging` costs an in-process `wtbox ls` ~2.6 ms: it stays unimported unless a line is logged."""
    code = ("import sys; from worktreebox.cli.main import run; sys.argv = ['wtbox', 'ls']\n"
            "try:\n    run()\nexcept SystemExit:\n    pass\nprint('logging' in sys.modules)")
    env = {**{k: v for k, v in os.environ.items() if k != "WTBOX_DEBUG"}, "WTBOX_HOME": str(wtbox_home)}
    for debug, imported in (({}, "False"), ({"WTBOX_DEBUG": "1"}, "True")):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                              env={**env, **debug})
        assert proc.stdout.split()[-1] == imported, proc.stderr


def test_v_shows_the_phases_of_new_and_the_config_read(wtbox_home, make_repo):
    from helpers import CORE_TOML

    repo = make_repo(toml=CORE_TOML)
    env = {**os.environ, "WTBOX_HOME": str(wtbox_home), "WTBOX_NO_AUTO_GC": "1"}
    env.pop("WTBOX_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "worktreebox.cli.main", "-v", "new", "t", "--repo", str(repo),
                           "--json"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    box = json.loads(proc.stdout)
    assert f"wtbox.config DEBUG repo config: {repo / 'wtbox.toml'}" in proc.stderr
    assert "wtbox.host DEBUG phase new:ready" in proc.stderr
    rm = subprocess.run([sys.executable, "-m", "worktreebox.cli.main", "rm", box["id"]], capture_output=True,
                        text=True, timeout=120, env=env)
    assert rm.returncode == 0 and "DEBUG" not in rm.stderr
