"""The package's shape: no import cycles among worktreebox modules (imports inside functions
and under TYPE_CHECKING count too), and resources never import the Host that composes them."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "worktreebox"


def module_names(root: Path) -> dict[str, Path]:
    """dotted module name -> file, for every .py under the package root."""
    out = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module of the package that `name` imports, wherever the import statement stands."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in modules]
            # `from . import git` imports the module worktreebox.system.git, not the package's own code
            targets = subs if len(subs) == len(node.names) else [mod, *subs]
        else:
            continue
        for t in targets:
            # `from . import git` names the module worktreebox.system.git; `from .box import Box` names worktreebox.box
            if t in modules and t != name:
                out.add(t)
    return out


def find_cycles(root: Path) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    modules = module_names(root)
    graph = {m: imports_of(m, p, modules) for m, p in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return cycles


def test_no_import_cycles_in_worktreebox():
    assert find_cycles(PACKAGE) == []


def test_cycle_finder_sees_a_cycle_inside_a_function_and_under_type_checking(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import x\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import y\n")
    (pkg / "d.py").write_text("from . import a\n")  # points into the cycle, is not part of it
    assert find_cycles(pkg) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    (pkg / "c.py").write_text("x = 1\n")
    assert find_cycles(pkg) == []


def test_resources_and_providers_never_import_host():
    modules = module_names(PACKAGE)
    offenders = []
    for name, path in modules.items():
        if name.startswith(("worktreebox.resources", "worktreebox.providers")):
            if "worktreebox.host" in imports_of(name, path, modules):
                offenders.append(name)
    assert offenders == []


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
        if isinstance(node.value, ast.Name) and node.value.id == "os" and node.attr in ("environ", "getenv", "environb"):
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
