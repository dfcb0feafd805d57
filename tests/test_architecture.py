"""The architecture rules of README "Architecture", checked: the import-linter contracts hold (and would catch a
break), no import cycles anywhere in `dlm/` (module level or inside functions), argparse only in the CLI, short
functions, and a test module per library module."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "dlm"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def module_name(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every `dlm` module this file imports, wherever the import statement is (functions, TYPE_CHECKING)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path) & modules.keys() - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            return cycle
    return None


def test_there_is_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_argparse_appears_only_in_the_cli_package():
    offenders = [module_name(p) for p in PACKAGE.rglob("*.py") if not p.is_relative_to(PACKAGE / "cli")
                 and imports_of(p) & {"argparse", "jsonargparse"}]
    assert offenders == []
    uses = [module_name(p) for p in PACKAGE.rglob("*.py") if not p.is_relative_to(PACKAGE / "cli")
            and ("SystemExit" in p.read_text() or "Namespace" in p.read_text())]
    assert uses == []


def test_no_function_is_longer_than_fifty_lines():
    long = [f"{module_name(p)}.{n.name}: {n.end_lineno - n.lineno + 1} lines" for p in PACKAGE.rglob("*.py")
            for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > 50]
    assert long == []


def test_every_library_module_has_its_test_module():
    modules = [p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    missing = [f"tests/{m.parent}/test_{m.name}".replace("/./", "/") for m in modules
               if not (REPO / "tests" / m.parent / f"test_{m.name}").is_file()]
    assert missing == []


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS)], cwd=root, capture_output=True, text=True, timeout=120,
                          env={"PATH": str(LINT_IMPORTS.parent), "PYTHONPATH": str(root)})


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("arch")
    shutil.copytree(PACKAGE, root / "dlm", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_import_contracts_hold(package_copy):
    proc = _lint(package_copy)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "6 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("tensor/masking.py", "import lightning", "Tensor code imports no Lightning"),
    ("decoding/engine.py", "from dlm.training import module", "Decoding imports nothing of training"),
    ("measurement/grid.py", "from dlm.data import datamodule", "Evaluation and measurement load checkpoints"),
    ("models/backbone.py", "from dlm.cli import main", "Nothing imports the CLI package"),
    ("settings/errors.py", "import torch", "Settings are plain dataclasses"),
    ("data/sources.py", "from dlm.decoding import engine", "Layers"),
])
def test_a_broken_rule_fails_the_lint(package_copy, module, line, contract):
    path = package_copy / "dlm" / module
    original = path.read_text()
    try:
        path.write_text(original + f"\n{line}  # planted by the test\n")
        proc = _lint(package_copy)
    finally:
        path.write_text(original)
    assert proc.returncode != 0
    broken = proc.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, proc.stdout[-3000:]
