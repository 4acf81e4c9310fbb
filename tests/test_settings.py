"""worktreebox/settings.py: every WTBOX_* variable wtbox reads is declared there once, read when
asked, documented in the README as the module prints it; nothing else reads one."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from worktreebox import settings

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "worktreebox"
# Variables wtbox gives a box's processes (it writes them; reading them is the processes' business).
BOX_VARIABLES = {"WTBOX_BOX_DIR", "WTBOX_SHELL", "WTBOX_SERVICE", "WTBOX_METRICS_URL", "WTBOX_OTLP_URL",
                 "WTBOX_OTLP_GRPC_ENDPOINT", "WTBOX_PROMETHEUS_REMOTE_WRITE_URL", "WTBOX_CDP_URL",
                 "WTBOX_FANOUT_INDEX", "WTBOX_FANOUT_N", "WTBOX_PORT_"}


def test_each_setting_is_declared_once_with_a_meaning_and_a_default():
    names = [s.name for s in settings.SETTINGS]
    assert len(names) == len(set(names))
    declared = [v for v in vars(settings).values() if isinstance(v, settings.Setting)]
    assert sorted(s.name for s in declared) == sorted(names)  # none declared and left out of SETTINGS
    for s in settings.SETTINGS:
        assert s.name.startswith("WTBOX_") and s.meaning and s.default, s.name


@pytest.mark.parametrize(("value", "on", "off"), [
    (None, False, False), ("", False, False), ("1", True, False), ("yes", True, False), ("0", False, True),
    ("off", False, True), ("OFF", False, True), ("false", False, True), ("no", False, True),
])
def test_switches(monkeypatch, value, on, off):
    if value is None:
        monkeypatch.delenv("WTBOX_DEBUG", raising=False)
    else:
        monkeypatch.setenv("WTBOX_DEBUG", value)
    assert (settings.DEBUG.on(), settings.DEBUG.off()) == (on, off)


@pytest.mark.parametrize(("value", "seconds"), [(None, 5.0), ("", 5.0), ("0.2", 0.2), ("7", 7.0), ("soon", 5.0)])
def test_seconds_fall_back_to_the_default(monkeypatch, value, seconds):
    if value is None:
        monkeypatch.delenv("WTBOX_KILL_WAIT", raising=False)
    else:
        monkeypatch.setenv("WTBOX_KILL_WAIT", value)
    assert settings.KILL_WAIT.seconds() == seconds


def test_read_when_asked_not_at_import(monkeypatch, tmp_path):
    monkeypatch.setenv("WTBOX_HOME", str(tmp_path / "a"))
    assert settings.default_home() == str(tmp_path / "a")
    monkeypatch.setenv("WTBOX_HOME", "~/b")
    assert settings.default_home() == str(Path.home() / "b")
    monkeypatch.delenv("WTBOX_HOME")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert settings.default_home() == str(tmp_path / "state" / "wtbox")


def test_the_readme_carries_the_table_as_the_module_prints_it():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- settings: generated -->\n(.*?)<!-- /settings -->", readme, re.S)
    assert block, "README.md has lost its settings table (between <!-- settings: generated --> and <!-- /settings -->)"
    assert block.group(1) == settings.markdown(), "regenerate it: python -m worktreebox.settings"


def test_every_variable_the_readme_names_is_a_setting_or_a_box_variable():
    named = set(re.findall(r"WTBOX_[A-Z_]+", (ROOT / "README.md").read_text()))
    unknown = {n for n in named if n not in {s.name for s in settings.SETTINGS}
               and not any(n == b or (b.endswith("_") and n.startswith(b)) for b in BOX_VARIABLES)}
    assert unknown == set()


def wtbox_reads(path: Path) -> list[str]:
    """WTBOX_* names read from the environment in a module: os.environ.get("WTBOX_..."),
    os.environ["WTBOX_..."], os.getenv("WTBOX_...")."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            target, arg = ast.unparse(node.func), node.args[0]
            if target in ("os.environ.get", "os.getenv", "environ.get") and isinstance(arg, ast.Constant):
                out.append(str(arg.value))
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) \
                and ast.unparse(node.value) in ("os.environ", "environ") and isinstance(node.slice, ast.Constant):
            out.append(str(node.slice.value))
    return [n for n in out if n.startswith("WTBOX_")]


def test_no_module_but_settings_reads_a_wtbox_variable():
    found = {str(p.relative_to(PACKAGE)): names for p in PACKAGE.rglob("*.py")
             if p.name != "settings.py" and (names := wtbox_reads(p))}
    assert found == {}


def test_the_reader_finder_sees_each_form(tmp_path):
    mod = tmp_path / "m.py"
    mod.write_text('import os\ndef f():\n    a = os.environ.get("WTBOX_A")\n    b = os.environ["WTBOX_B"]\n'
                   '    c = os.getenv("WTBOX_C", "1")\n    os.environ["WTBOX_D"] = "x"\n'
                   '    e = os.environ.get("HOME")\n')
    assert wtbox_reads(mod) == ["WTBOX_A", "WTBOX_B", "WTBOX_C"]
