"""The package's shape beyond its import arrows: no own module behind `except ImportError`, no
environment read at import. Arrows and cycles are import-linter's contracts (pyproject.toml), run
by scripts/test.sh before the suite."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "worktreebox"


def test_no_own_module_imported_under_try_except_importerror():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Try):
                continue
            catches = {ast.unparse(h.type) for h in node.handlers if h.type is not None}
            if not catches & {"ImportError", "ModuleNotFoundError"}:
                continue
            for inner in node.body:
                if isinstance(inner, ast.ImportFrom) and inner.level:
                    offenders.append(f"{path.relative_to(PACKAGE)}:{inner.lineno}")
    assert offenders == []


def environ_read_at_import(path: Path) -> list[int]:
    """Lines that read os.environ / os.getenv outside any function: run once, at import."""
    tree = ast.parse(path.read_text(), str(path))
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if id(node) in inside or not isinstance(node, ast.Attribute):
            continue
        reads_env = node.attr in ("environ", "getenv", "environb")
        if isinstance(node.value, ast.Name) and node.value.id == "os" and reads_env:
            out.append(node.lineno)
    return out


def test_no_environment_read_at_import():
    """A CLI server (cliserver.py) imports the package once and serves callers with other
    environments: a value read at import would be the server's, frozen."""
    found = {str(p.relative_to(PACKAGE)): lines for p in PACKAGE.rglob("*.py") if (lines := environ_read_at_import(p))}
    assert found == {}


def test_import_time_environment_reads_are_seen(tmp_path):
    mod = tmp_path / "m.py"
    mod.write_text("import os\nWAIT = float(os.environ.get('X', '5'))\n\ndef f():\n    return os.environ['Y']\n")
    assert environ_read_at_import(mod) == [2]


def own_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_top_level_stays_small_and_no_module_is_long():
    """Issue 25: a newcomer finds a concern by its package; a module is read whole."""
    top = [p.name for p in PACKAGE.glob("*.py")]
    assert len(top) <= 12, top
    long = {str(p.relative_to(PACKAGE)): n for p in own_modules() if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}


def test_only_procfs_names_proc():
    """One module reads /proc (system/procfs.py); the sandbox's bwrap argv mounts a fresh one."""
    allowed = {"system/procfs.py", "providers/sandbox/layout.py"}
    offenders = [str(p.relative_to(PACKAGE)) for p in own_modules()
                 if "/proc/" in p.read_text() and str(p.relative_to(PACKAGE)) not in allowed]
    assert offenders == []
    layout = (PACKAGE / "providers/sandbox/layout.py").read_text()
    assert "/proc/" not in layout  # the mount point only ("/proc"), never a file under it
