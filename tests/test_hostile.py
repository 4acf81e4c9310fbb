"""Hostile input, systematically: hundreds of malformed wtbox.toml files and host configs, and
hostile command-line arguments. Every case must end in exit 1 or 2 with one sentence on stderr,
no traceback, nothing written outside $WTBOX_HOME and the box, and no box left half-made.

Config cases are checked in-process (the parsers, then `Host.new` for the few that can only fail
when rendered), a sample of them through the real CLI; CLI arguments run through the real CLI in
a few batched interpreter processes (one subprocess per case would cost ~150 ms each).
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import CORE_TOML, git

from worktreebox.config.load import load_host_config, parse_repo_config
from worktreebox.errors import ConfigError

MARK = "wtbox-escaped"  # every service or setup command of a case touches this file in its cwd

# ---------------------------------------------------------------- wtbox.toml cases

# (section, key) -> TOML values that must be refused there. Sections other than services.web
# get a valid service too, so that a case fails for its own key and not for a missing one.
BAD_VALUES: dict[tuple[str, str], list[str]] = {
    ("box", "ports"): ['5', '"web"', '[1]', '["Web"]', '["web", "web"]', '[""]', '["' + "a" * 40 + '"]',
                       '["wéb"]', '["w\\u0000b"]', '[true]', '{ web = "x" }', '{ web = 5432 }',
                       '{ web = 3000, api = 3000 }', '["web;rm"]', '["../x"]',
                       "[" + ", ".join(f'"p{i}"' for i in range(300)) + "]"],
    ("box", "ttl"): ['-1', '"-5h"', '"forever"', 'true', '[]', 'nan', 'inf', '-inf', '"1e999h"', '1e300',
                     '9223372036854775807', '0', '"0s"', '"5 parsecs"', '"\\u0000"'],
    ("box", "copy"): ['"a:b"', '[1]', '["/etc/passwd:x"]', '["README.md:/tmp/x"]', '["../a:b"]',
                      '["README.md:../../b"]', '[":"]', '["a\\u0000:b"]', '["README.md:.git/config"]',
                      '["README.md:b/../../c"]', '["README.md:\\u001b[31m"]', '[""]'],
    ("box", "env"): ['5', '"X=1"', '{ "1X" = "a" }', '{ "A-B" = "a" }', '{ X = true }', '{ X = [1] }',
                     '{ X = { y = 1 } }', '{ X = "a\\u0000b" }', '{ "" = "a" }', '{ "ÄX" = "1" }',
                     '{ X = "{{ ports.web " }', '{ X = "{% if %}" }', '{ X = "{{ }}" }',
                     '{ X = "{{ ports.nope }}" }', '{ X = "{{ nothing.here }}" }', '{ X = "{% endfor %}" }'],
    ("box", "cache_env"): ['{ X = "/abs" }', '{ X = "../up" }', '{ X = "a\\u0000" }', '"npm"',
                           '{ X = true }', '{ "9" = "x" }'],
    ("setup", "cmd"): ['5', 'true', '[]', '"a\\u0000b"', '"{{ box.id "', '"{% for %}"', '"{{ box.nope }}"'],
    ("setup", "timeout"): ['-1', '"0s"', 'nan', 'inf', '"never"', '1e300', '[]', 'true', '0'],
    ("database", "mode"): ['"schemas"', '5', '"NONE"', '""', '"none\\u0000"', 'true', '["none"]'],
    ("database", "extensions"): ['"uuid-ossp"', '[1]', '["a\\u0000"]', '[""]', '["x\\ny"]'],
    ("database", "migrate"): ['5', '[]', '"a\\u0000"', '{ cmd = "x" }'],
    ("database", "migrations"): ['"alembic/**"', '[5]', '["a\\u0000"]'],
    ("database", "env"): ['5', '{ "a b" = "x" }', '{ X = "{{ db.url " }', '{ X = false }'],
    ("database", "provider"): ['"mysql"', '5', '""'],
    ("observability", "enabled"): ['"yes"', '1', '[]', '"true"'],
    ("observability", "collector"): ['"fluentd"', '5'],
    ("observability", "provider"): ['"k8s"', 'false'],
    ("observability", "retention"): ['5', '"forever"', '"-1d"', '""', '"2d\\u0000"', 'nan'],
    ("observability", "victorialogs_url"): ['5', '"not a url"', '"ftp://x"', '"http://a b"',
                                            '"http://x\\u001b"', '""'],
    ("services.web", "cmd"): ['5', '""', '[]', '"a\\u0000"', '"{{ ports.web "', '"{{ ports.web }"',
                              '"{% if x %}"', '"   "', '"{{ ports.nope }}"', '"{{ box.id | nofilter }}"'],
    ("services.web", "cwd"): ['"../../../.."', '"/tmp"', '"a/../../b"', '".."', '"a\\u0000"', '5',
                              '"\\u001b[31m"', '"{{ box.dir }}/.."', '"{{ box.home }}"', '"./../.."',
                              '"{{ box.path }}/../../.."', '"{{ box.nope }}"', '"/"'],
    ("services.web", "env"): ['[]', '{ "x-y" = "1" }', '{ X = "{{ ports.nope }}" }', '{ X = "a\\u0000" }'],
    ("services.web", "ready"): ['5', '"tcp:"', '"tcp:99999"', '"tcp:-1"', '"tcp:abc"', '"http://"',
                                '"http://127.0.0.1:99999/"', '"{{ ports.web "', '"tcp:{{ ports.nope }}"',
                                '"http://[::1/"', '[]'],
    ("services.web", "ready_timeout"): ['-1', '0', 'nan', 'inf', '"soon"', '1e300', '"-3s"'],
    ("services.web", "restart"): ['"sometimes"', 'true', '5', '"ALWAYS"'],
    ("services.web", "depends_on"): ['"db"', '["nope"]', '["web"]', '[5]', '[""]'],
    ("services.web", "metrics"): ['5', '"nope"', '"ftp://x"', '"http://a b/"', '"{{ ports.web "'],
}

UNKNOWN_KEYS = {"box": "port", "setup": "command", "database": "url", "observability": "enable",
                "services.web": "command"}

RAW_CASES = {
    "toml-unclosed-table": "[box\nports = [",
    "toml-unclosed-string": '[box]\nttl = "72h',
    "toml-duplicate-key": "[box]\nttl = 1\nttl = 2",
    "toml-duplicate-table": "[box]\n[box]",
    "toml-bare-garbage": "this is not toml",
    "toml-control-char": "[box]\nttl = \"1h\u0007\"",
    "toml-bom-twice": "\ufeff\ufeff[box]",
    "toml-huge-int": "[box]\nttl = " + "9" * 5000,
    "toml-huge-int-env": "[box]\nenv = { X = " + "9" * 4400 + " }",
    "toml-deep-nesting": "[box]\nenv = " + "{ a = " * 40 + "1" + " }" * 40,
    "toml-nul": "[box]\x00",
    "toml-lone-surrogate-escape": '[box]\nttl = "\\ud800"',
    "section-unknown": "[boxes]\nports = [\"web\"]",
    "section-service-singular": "[service.web]\ncmd = \"x\"",
    "section-box-not-table": "box = 5",
    "section-setup-not-table": 'setup = "make"',
    "section-services-array": "[[services]]\ncmd = \"x\"",
    "service-name-upper": "[services.Web]\ncmd = \"x\"",
    "service-name-space": "[services.\"we b\"]\ncmd = \"x\"",
    "service-name-unicode": "[services.\"ü\"]\ncmd = \"x\"",
    "service-name-nul": "[services.\"a\\u0000\"]\ncmd = \"x\"",
    "service-name-empty": "[services.\"\"]\ncmd = \"x\"",
    "service-name-dots": "[services.\"..\"]\ncmd = \"x\"",
    "service-not-table": "[services]\nweb = 5",
    "service-string": "[services]\nweb = \"python app.py\"",
    "service-no-cmd": "[services.web]\nready = \"tcp:1\"",
    "service-cycle": "[services.a]\ncmd = \"x\"\ndepends_on = [\"b\"]\n[services.b]\ncmd = \"x\"\ndepends_on = [\"a\"]",
    "service-deep-cycle": "".join(f"[services.s{i}]\ncmd = \"x\"\ndepends_on = [\"s{(i + 1) % 30}\"]\n"
                                  for i in range(30)),
}


def with_key(section: str, key: str, value: str) -> str:
    """A wtbox.toml that is valid except for `key = value` in [section] (each table appears once)."""
    tables = {"database": ['mode = "none"'], "observability": ["enabled = false"],
              "services.web": [f'cmd = "touch {MARK} && exec sleep 60"']}
    tables.setdefault(section, [])
    tables[section] = [ln for ln in tables[section] if not ln.startswith(f"{key} =")] + [f"{key} = {value}"]
    return "".join(f"[{name}]\n" + "\n".join(lines) + "\n\n" for name, lines in tables.items())


def repo_cases() -> list[tuple[str, str]]:
    """(case id, wtbox.toml text): every one of them must be refused."""
    cases = []
    for (section, key), values in BAD_VALUES.items():
        for i, value in enumerate(values):
            cases.append((f"{section}.{key}-{i}", with_key(section, key, value)))
    for section, key in UNKNOWN_KEYS.items():
        cases.append((f"{section}-unknown-key", with_key(section, key, "1")))
    for name, text in RAW_CASES.items():
        cases.append((name, text))
    return cases


REPO_CASES = repo_cases()


def test_there_are_enough_cases():
    assert len(REPO_CASES) + len(HOST_CASES) >= 200, (len(REPO_CASES), len(HOST_CASES))
    assert len(CLI_CASES) >= 100, len(CLI_CASES)
    assert len({c for c, _ in REPO_CASES}) == len(REPO_CASES)


def _one_sentence(msg: str) -> None:
    assert msg and "\n" not in msg.strip() and "Traceback" not in msg, repr(msg)


def _files_outside(root: Path, skip: tuple[Path, ...]) -> set[str]:
    """Every file under root except under `skip` (the home, the repos' .git directories)."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = [n for n in dirnames if d / n not in skip and n != ".git"]
        out.update(str(d / f) for f in filenames)
    return out


@pytest.mark.parametrize(("case", "text"), REPO_CASES, ids=[case for case, _ in REPO_CASES])
def test_malformed_wtbox_toml_is_refused_in_one_sentence(case, text):
    """The parser refuses each case with one sentence naming the file, or the case is one that only
    a render over box facts can catch (a template), which Host.new must refuse (the test below)."""
    try:
        parse_repo_config(text, "wtbox.toml")
    except ConfigError as e:
        assert "\n" not in str(e).strip() and "wtbox.toml" in str(e), str(e)
    else:
        assert "{{" in text, f"accepted {text!r}"


def _parses(text: str) -> bool:
    try:
        parse_repo_config(text, "wtbox.toml")
    except ConfigError:
        return False
    return True


RENDER_CASES = [(case, text) for case, text in REPO_CASES if "{{" in text and _parses(text)]


@pytest.mark.parametrize(("case", "text"), RENDER_CASES, ids=[case for case, _ in RENDER_CASES])
def test_a_case_only_a_render_can_refuse_fails_new_in_one_sentence(tmp_path, make_repo, host, case, text):
    """Host.new fails with one sentence and leaves no box, branch or file outside the home."""
    repo = make_repo(name="repo")
    before = _files_outside(tmp_path, (host.home,))
    cfg = parse_repo_config(text, "wtbox.toml")
    with pytest.raises(ConfigError) as e:  # a WtboxError of another kind: accepted, then failed late
        host.new("hostile", repo=repo, config=cfg)
    assert "\n" not in str(e.value).strip(), str(e.value)
    assert host.list() == [] and not (host.boxes_dir.exists() and any(host.boxes_dir.iterdir()))
    assert git(repo, "branch", "--list", "wtbox/*") == ""
    assert _files_outside(tmp_path, (host.home,)) == before
    assert not Path("/tmp", MARK).exists()


def test_some_cases_get_as_far_as_a_render():
    assert 5 <= len(RENDER_CASES) < len(REPO_CASES) / 4, len(RENDER_CASES)


@pytest.mark.slow
def test_a_sample_of_malformed_configs_through_the_cli(tmp_path, make_repo, wtbox_home):
    rng = random.Random(19)
    sample = rng.sample(REPO_CASES, 24)
    repos = [(case, make_repo(toml=text, name=f"r{i}")) for i, (case, text) in enumerate(sample)]
    env = {**os.environ, "WTBOX_HOME": str(wtbox_home), "WTBOX_NO_AUTO_GC": "1"}

    def run(item):
        case, repo = item
        return case, subprocess.run([sys.executable, "-m", "worktreebox.cli.main", "new", "t", "--repo", str(repo)],
                                    capture_output=True, text=True, env=env, timeout=60)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, repos))
    for case, proc in results:
        assert proc.returncode in (1, 2), (case, proc.returncode, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        one_sentence = len(lines) == 1 and lines[0].startswith("wtbox: ")
        assert one_sentence and "Traceback" not in proc.stderr, (case, proc.stderr)
    boxes = wtbox_home / "boxes"
    assert not boxes.exists() or not any(boxes.iterdir())
    for _, repo in repos:
        assert git(repo, "branch", "--list", "wtbox/*") == ""


# ---------------------------------------------------------------- host config cases

HOST_BAD = {
    ("host", "port_range"): ['5', '"20000"', '"abc-def"', '"30000-20000"', '"0-100"', '"1000-70000"',
                             '"20000-20000"', '"-1-5"', '"20000-29999\\u0000"', '["20000", "29999"]',
                             '"99999999999999999999-99999999999999999999"'],
    ("host", "max_boxes"): ['-1', '0', '"64"', '1.5', 'true', '9223372036854775807', 'nan'],
    ("database", "provider"): ['"mysql"', '5', '""', '"Embedded"'],
    ("database", "url"): ['5', '"nope"', '"mysql://x"', '""', '"postgresql://a b@h/db"',
                          '"postgresql://h/\\u0000"'],
    ("database", "image"): ['5', '""', '"a b"', '"img\\u0000"', '"\\u001b[31m"'],
    ("database", "fsync_off"): ['"no"', '0', '[]'],
    ("observability", "provider"): ['"k8s"', '5'],
    ("observability", "image"): ['""', '7', '"a\\nb"'],
}
HOST_RAW = {
    "host-unknown-section": "[hots]\nport_range = \"20000-20099\"",
    "host-unknown-key": "[host]\nport_rang = \"20000-20099\"",
    "host-not-table": "host = 5",
    "host-invalid-toml": "[host\n",
    "host-binary": "\udcff\udcfe",  # written as raw bytes below
    "host-database-unknown": "[database]\nuser = \"x\"",
    "host-huge-int": "[host]\nmax_boxes = " + "9" * 5000,
    "host-box-section": "[box]\nports = [\"web\"]",
}
HOST_ENV = {
    "env-port-range-garbage": {"WTBOX_PORT_RANGE": "garbage"},
    "env-port-range-reversed": {"WTBOX_PORT_RANGE": "30000-20000"},
    "env-port-range-huge": {"WTBOX_PORT_RANGE": "1-9999999999999999999999"},
    "env-provider": {"WTBOX_DATABASE_PROVIDER": "mysql"},
    "env-obs-provider": {"WTBOX_OBSERVABILITY_PROVIDER": "k8s"},
    "env-postgres-url": {"WTBOX_POSTGRES_URL": "not a url"},
}


def host_cases() -> list[tuple[str, bytes, dict[str, str]]]:
    cases = []
    for (section, key), values in HOST_BAD.items():
        for i, value in enumerate(values):
            cases.append((f"host:{section}.{key}-{i}", f"[{section}]\n{key} = {value}\n".encode(), {}))
    for name, text in HOST_RAW.items():
        data = b"\xff\xfe\x00[host]" if name == "host-binary" else text.encode()
        cases.append((name, data, {}))
    for name, env in HOST_ENV.items():
        cases.append((name, b"", env))
    return cases


HOST_CASES = host_cases()
_HOST_ENV_VARS = ("WTBOX_PORT_RANGE", "WTBOX_DATABASE_PROVIDER", "WTBOX_OBSERVABILITY_PROVIDER",
                  "WTBOX_POSTGRES_URL", "WTBOX_POSTGRES_IMAGE", "WTBOX_VICTORIAMETRICS_IMAGE")


@pytest.mark.parametrize(("case", "data", "env"), HOST_CASES, ids=[case for case, _, _ in HOST_CASES])
def test_malformed_host_config_is_refused_in_one_sentence(tmp_path, monkeypatch, case, data, env):
    for var in _HOST_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_bytes(data)
    with pytest.raises(ConfigError) as e:  # any other exception fails the case as it is
        load_host_config(home)
    assert "\n" not in str(e.value).strip(), str(e.value)


@pytest.mark.slow
def test_a_sample_of_host_configs_through_the_cli(tmp_path, make_repo):
    repo = make_repo(toml=CORE_TOML)
    sample = random.Random(19).sample(HOST_CASES, 10)
    base = {k: v for k, v in os.environ.items() if k not in _HOST_ENV_VARS}

    def run(item):
        i, (case, data, env) = item
        home = tmp_path / f"cli{i}"
        home.mkdir()
        (home / "config.toml").write_bytes(data)
        proc = subprocess.run([sys.executable, "-m", "worktreebox.cli.main", "new", "t", "--repo", str(repo)],
                              capture_output=True, text=True, timeout=60,
                              env={**base, **env, "WTBOX_HOME": str(home), "WTBOX_NO_AUTO_GC": "1"})
        return case, home, proc

    with ThreadPoolExecutor(4) as pool:
        for case, home, proc in pool.map(run, enumerate(sample)):
            assert proc.returncode == 2, (case, proc.returncode, proc.stderr)
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("wtbox: "), (case, proc.stderr)
            assert not (home / "boxes").exists() or not any((home / "boxes").iterdir()), case
    assert git(repo, "branch", "--list", "wtbox/*") == ""


# ---------------------------------------------------------------- hostile CLI arguments

# BOX stands for a real box of the test's home, REPO for a real repo: the cases fail on their
# hostile part, not on a missing box.
_WEIRD = ["", " ", "-", "--", "../..", "/", "/etc/passwd", "💥", "\u202etxt.exe", "\x1b[31mred", "a\tb",
          "x" * 5000, "%s%n", "$(touch pwned)", "`touch pwned`", "; touch pwned", "NUL\x7f", "\udcff"]

CLI_CASES: list[list[str]] = []
for w in _WEIRD:
    for cmd in ("status", "rm", "env", "up", "keep", "logs"):
        if w in ("-", "--") and cmd == "rm":
            continue  # `rm --` means "the box around the cwd": covered below
        CLI_CASES.append([cmd, "--", w] if w.startswith("-") else [cmd, w])
CLI_CASES += [
    ["new"], ["new", "--", ""], ["new", "--", "-rf"], ["new", "💥"], ["new", "x" * 300],
    ["new", "t", "--repo", "/nonexistent"], ["new", "t", "--repo", "/dev/null"], ["new", "t", "--repo", ""],
    ["new", "t", "--repo", "REPO", "--from", "no-such-ref"], ["new", "t", "--repo", "REPO", "--from", "--help;x"],
    ["new", "t", "--repo", "REPO", "--from", "HEAD~999"], ["new", "t", "--repo", "REPO", "--ttl", "-5h"],
    ["new", "t", "--repo", "REPO", "--ttl", "nan"], ["new", "t", "--repo", "REPO", "--ttl", "1e999"],
    ["new", "t", "--repo", "REPO", "--ttl", "forever"], ["new", "t", "--repo", "REPO", "--ttl", "0"],
    ["new", "t", "--repo", "REPO", "--ttl", "9" * 400], ["new", "t", "--repo", "REPO", "--secret", "A=B"],
    ["new", "t", "--repo", "REPO", "--secret", "1X"], ["new", "t", "--repo", "REPO", "--secret", ""],
    ["new", "t", "--repo", "REPO", "--secret", "NOT_SET_ANYWHERE_19"],
    ["new", "t", "--repo", "REPO", "--secret", "X=@/nonexistent"], ["new", "t", "--repo", "REPO", "--secret", "X=@/"],
    ["new", "t", "--repo", "REPO", "--bogus"], ["new", "t", "u", "--repo", "REPO"],
    ["logs", "BOX", "--since", "garbage"], ["logs", "BOX", "--until", "yesterday-ish"],
    ["logs", "BOX", "--level", "loud"], ["logs", "BOX", "--grep", "("], ["logs", "BOX", "-n", "-1"],
    ["logs", "BOX", "-n", "abc"], ["logs", "BOX", "--since", "-5m"], ["logs", "BOX", "--since", "1e999s"],
    ["logs", "BOX", "--since", "9999-99-99T99:99"], ["logs", "BOX", "-f", "--since", "nope"],
    ["logs", "BOX", "-n", "1e3"], ["new", "t", "--repo", "REPO", "--ttl", "0s"],
    ["up", "BOX", "nosuchservice"], ["restart", "BOX", "../x"], ["down", "BOX", "web", "extra"],
    ["env", "BOX", "--format", "xml"], ["env", "BOX", "--format", ""],
    ["exec", "BOX"], ["exec", "BOX", "--"], ["exec", "nosuchbox", "--", "true"], ["exec", "", "--", "true"],
    ["metrics", "BOX", "--range", "forever", "up"], ["metrics", "BOX", "--step", "-1s", "--range", "1h", "up"],
    ["probe", "BOX", "/", "-n", "0"], ["probe", "BOX", "/", "-c", "100000"], ["probe", "BOX", "/", "-n", "-1"],
    ["probe", "BOX", "ftp://example.com/"],
    ["gc", "--grace", "soon"], ["gc", "--grace", "-1"], ["gc", "--grace", "nan"], ["gc", "--bogus"],
    ["rm", "--all"], ["rm", "nosuchbox", "BOX"], ["rm", "--keep-branch", "🙃"],
    ["fanout", "t"], ["fanout", "t", "-n", "0", "--repo", "REPO"], ["fanout", "t", "-n", "-3", "--repo", "REPO"],
    ["fanout", "t", "-n", "100000", "--repo", "REPO"],
    ["fanout", "t", "-n", "2", "--timeout", "soon", "--repo", "REPO"],
    ["fanout", "", "-n", "2", "--repo", "REPO"], ["fanout", "t", "-n", "2", "--jobs", "0", "--repo", "REPO"],
    ["compare", "--sort", "worst", "BOX"], ["compare", "--fanout", "nosuchtask"], ["compare", "nosuchbox"],
    ["pick", "nosuchbox"], ["pick", "BOX", "--merge-into", "--yes"],
    ["pick", "BOX", "--merge-into", "no/such/branch..lock"],
    ["init", "--repo", "/nonexistent"], ["init", "--repo", "/dev/null"],
    ["init", "--explain", "--repo", "/nonexistent"],
    ["test", "nosuchbox"], ["test", "BOX", "--timeout", "soon"], ["test", "BOX", "--timeout", "-1s"],
    ["db", "frobnicate"], ["nosuchcommand"], ["--bogus"], ["status", "BOX", "extra-arg"],
    ["status", "--show-secrets", "--json", "nosuchbox"], ["ls", "extra"], ["doctor", "--bogus"],
    ["mcp", "--http", "0.0.0.0:8000"], ["mcp", "--http", "[::]:8000"], ["mcp", "--http", "127.0.0.1:99999"],
    ["mcp", "--http", "127.0.0.1"], ["mcp", "--http", ""], ["mcp", "--http", "evil.example:80"], ["mcp", "--bogus"],
]


def _driver_source() -> str:
    """Runs many CLI invocations in one interpreter; one JSON result per case on stdout."""
    return r'''
import contextlib, io, json, os, sys, traceback
from worktreebox.cli import main as cli
cases = json.loads(sys.stdin.read())
results = []
for argv in cases:
    out, err = io.StringIO(), io.StringIO()
    code = 0
    sys.argv = ["wtbox", *argv]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.run()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = -1
    results.append({"argv": argv, "code": code, "stderr": err.getvalue(), "stdout": out.getvalue()})
sys.__stdout__.write(json.dumps(results))
'''


def test_hostile_cli_arguments_exit_1_or_2_in_one_sentence(tmp_path, make_repo, run_wtbox, wtbox_home):
    repo = make_repo(toml=CORE_TOML + '[services.web]\ncmd = "sleep 60"\n')
    box = json.loads(run_wtbox("new", "target", "--repo", str(repo), "--no-services", "--json").stdout)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = _files_outside(tmp_path, (wtbox_home,))
    cases = [[box["id"] if a == "BOX" else str(repo) if a == "REPO" else a for a in argv] for argv in CLI_CASES]
    # argv cannot carry lone surrogates through exec; give them as the bytes the OS would pass
    env = {**os.environ, "WTBOX_HOME": str(wtbox_home), "WTBOX_NO_AUTO_GC": "1",
           "PYTHONIOENCODING": "utf-8:surrogateescape"}
    env.pop("NOT_SET_ANYWHERE_19", None)
    batches = [cases[i::3] for i in range(3)]

    def run(batch):
        proc = subprocess.run([sys.executable, "-c", _driver_source()], input=json.dumps(batch, ensure_ascii=True),
                              capture_output=True, text=True, env=env, cwd=cwd, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout)

    with ThreadPoolExecutor(3) as pool:
        results = [r for batch in pool.map(run, batches) for r in batch]
    assert len(results) == len(cases)
    bad = []
    for r in results:
        lines = r["stderr"].strip().splitlines()
        if r["code"] not in (1, 2) or len(lines) != 1 or not lines[0].startswith("wtbox: ") \
                or "Traceback" in r["stderr"]:
            bad.append(([a[:60] for a in r["argv"]], r["code"], r["stderr"][-400:]))
    assert not bad, "\n".join(map(repr, bad))
    # nothing ran in a shell, nothing was written outside the home, the target box is untouched
    assert not any(cwd.iterdir())
    assert _files_outside(tmp_path, (wtbox_home,)) == before
    live = json.loads(run_wtbox("ls", "--json").stdout)
    assert [b["id"] for b in live] == [box["id"]] and live[0]["state"] == "ready"
    # a sample as real separate processes, the way a user's shell runs them
    sample = random.Random(19).sample(cases, 12)
    with ThreadPoolExecutor(4) as pool:
        procs = list(pool.map(lambda a: run_wtbox(*a, check=False, cwd=cwd), sample))
    for argv, proc in zip(sample, procs, strict=True):
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode in (1, 2) and len(lines) == 1 and "Traceback" not in proc.stderr, (argv[:3], proc.stderr)


def test_symlinks_do_not_lead_paths_out_of_the_worktree(tmp_path, make_repo, host):
    """A committed symlink that points outside must not carry `copy` or a service's cwd with it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not yours")
    repo = make_repo(name="linky")
    (repo / "out").symlink_to(outside)
    (repo / "secret").symlink_to(outside / "secret.txt")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "links")
    tables = CORE_TOML + "[box]\n"
    for case, text in {
        "copy-into-symlinked-dir": tables + 'copy = ["README.md:out/planted"]\n',
        "copy-from-symlink": tables + 'copy = ["secret:stolen.txt"]\n',
        "cwd-through-symlink": CORE_TOML + f'[services.web]\ncmd = "touch {MARK} && exec sleep 60"\ncwd = "out"\n',
    }.items():
        cfg = parse_repo_config(text, "wtbox.toml")
        with pytest.raises(ConfigError) as e:
            host.new("links", repo=repo, config=cfg)
        _one_sentence(str(e.value))
        assert "outside" in str(e.value), (case, str(e.value))
        assert host.list() == [], case
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    assert git(repo, "branch", "--list", "wtbox/*") == ""
