"""The package's structure: imports run one way (ground floor first), private modules stay in
their package, and no file grows past 700 lines. Every import counts, also one inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "snnorm"
MAX_LINES = 700

# ground floor first; a module may import from its own floor or below. The longest prefix decides a
# module's floor, so "snnorm" (the package's __init__, which re-exports) is the top.
FLOORS = (
    "snnorm._checks",
    "snnorm.params",
    "snnorm._welford",
    "snnorm._recompute",
    "snnorm._outputs",
    "snnorm.surrogate",
    "snnorm.kernels",
    "snnorm.backends",
    "snnorm.base",
    "snnorm._steps",
    "snnorm._bn_state",
    "snnorm.layer",
    "snnorm.neuron",
    "snnorm._fx",
    "snnorm._dataflow",
    "snnorm.folding",
    "snnorm.fusion",
    "snnorm.memopt",
    "snnorm.distributed",
    "snnorm.porting",
    "snnorm.functional",
    "snnorm.demo",
    "snnorm",
)


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The known module that ``name`` (a module or a name inside one) belongs to."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(name: str, path: Path) -> set[str]:
    is_package = path.name == "__init__.py"
    base = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base.split(".")
                parent = ".".join(parent[: len(parent) - node.level + 1])
                origin = f"{parent}.{node.module}" if node.module else parent
            else:
                origin = node.module or ""
            # `from pkg import mod` depends on pkg.mod; `from pkg import name` on pkg
            targets = [f"{origin}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            module = _resolve(target)
            if module and module != name and module.startswith("snnorm"):
                out.add(module)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _floor(module: str) -> int:
    best, length = -1, -1
    for index, prefix in enumerate(FLOORS):
        if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
            best, length = index, len(prefix)
    return best


def test_every_module_has_a_floor():
    assert all(_floor(m) >= 0 for m in MODULES), [m for m in MODULES if _floor(m) < 0]


def test_no_import_runs_upward():
    upward = [
        f"{a} (floor {FLOORS[_floor(a)]}) imports {b} (floor {FLOORS[_floor(b)]})"
        for a, targets in GRAPH.items()
        for b in targets
        # a package's __init__ may re-export its own children
        if _floor(b) > _floor(a) and not b.startswith(a + ".")
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(GRAPH):
        if start not in state:
            visit(start, [start])
    assert not cycles, "\n".join(cycles)


def test_private_modules_are_used_only_inside_their_package():
    leaks = []
    for a, targets in GRAPH.items():
        for b in targets:
            parent, _, leaf = b.rpartition(".")
            if leaf.startswith("_") and not leaf.startswith("__") and not (a == parent or a.startswith(parent + ".")):
                leaks.append(f"{a} imports {b}, private to {parent}")
    assert not leaks, "\n".join(leaks)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_file_is_over_the_line_limit(name):
    lines = MODULES[name].read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(PACKAGE.parent)} has {lines} lines (at most {MAX_LINES})"


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The graph counts a lazy import: base -> memopt used to hide inside a method."""
    source = "def f():\n    from .memopt import checkpoint\n"
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert "snnorm.memopt" in _imports("snnorm.probe", path)


def test_tests_use_only_perfs_public_tools():
    """What tests and perf share lives in perf.tools; a test takes its public names, or runs a
    sweep script as a whole (its smoke test), never a private name or a tool's inner module."""
    offenders = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("perf"):
                names = [alias.name for alias in node.names]
                if node.module.startswith("perf.tools.") or any(n.startswith("_") for n in names):
                    offenders.append(f"{path.name}:{node.lineno} from {node.module} import {', '.join(names)}")
    assert not offenders, "\n".join(offenders)
