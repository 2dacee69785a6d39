"""The floors of docs/architecture.md hold: no import from a lower floor to a higher one, no import cycle between
files, every module on a floor. Imports are read from the source (module level, inside functions, and under
``TYPE_CHECKING``), so a lazy import cannot hide an upward dependency."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DOC = ROOT / "docs" / "architecture.md"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "hyprec").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules ``name`` imports (``from a import b`` counts ``a.b`` when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import hyprec.layers.linear as x` names a module; a.b.C -> a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _floors() -> list[tuple[str, list[str]]]:
    """``(floor, listed module names)`` from the doc's table, lowest first."""
    floors = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and re.match(r"\d+ ", cells[0]):
            floors.append((cells[0], re.findall(r"`([\w.]+)`", cells[2])))
    return floors


def _floor_of(module: str, floors: list[tuple[str, list[str]]]) -> int | None:
    """Index of the floor listing ``module`` or its nearest listed package (the root ``hyprec`` covers only itself)."""
    best: tuple[int, int] | None = None
    for index, (_, names) in enumerate(floors):
        for listed in names:
            covers = module == listed or (listed != "hyprec" and module.startswith(listed + "."))
            if covers and (best is None or len(listed) > best[1]):
                best = (index, len(listed))
    return None if best is None else best[0]


MODULES = _modules()
GRAPH = {name: _imports(name, path, MODULES) for name, path in MODULES.items()}
FLOORS = _floors()


def test_the_doc_lists_ten_floors_and_every_listed_name_exists():
    assert [f.split()[0] for f, _ in FLOORS] == [str(i) for i in range(1, 11)]
    listed = [name for _, names in FLOORS for name in names]
    assert len(listed) == len(set(listed)), "a module is listed on two floors"
    assert not [name for name in listed if name not in MODULES], "listed names must be modules or packages"


def test_every_module_stands_on_a_floor():
    assert [m for m in MODULES if _floor_of(m, FLOORS) is None] == []


def test_no_import_goes_up_a_floor():
    upward = []
    for module, targets in GRAPH.items():
        here = _floor_of(module, FLOORS)
        for target in sorted(targets):
            there = _floor_of(target, FLOORS)
            if here is not None and there is not None and there > here:
                upward.append(f"{module} ({FLOORS[here][0]}) imports {target} ({FLOORS[there][0]})")
    assert upward == []


def test_no_import_cycle_between_files():
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(GRAPH[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert cycles == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import hyprec.layers.linear as linear\n", {"hyprec.layers.linear"}),
        ("from hyprec.layers import linear, norm\n", {"hyprec.layers.linear", "hyprec.layers.norm"}),
        ("def f():\n    from hyprec.engine.base import ModelEngine\n", {"hyprec.engine.base"}),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .plan import PrecisionPlan\n",
            {"hyprec.precision.plan"},
        ),
    ],
)
def test_every_kind_of_import_is_seen(tmp_path, source, expected):
    """The reader behind the rules finds absolute, package, lazy and type-only relative imports."""
    path = tmp_path / "policy.py"
    path.write_text(source)
    assert _imports("hyprec.precision.policy", path, MODULES) == expected


def test_an_upward_import_would_be_caught():
    """The floor rule is not vacuous: the model loader importing the CLI is flagged."""
    here, there = _floor_of("hyprec.engine.model_loading", FLOORS), _floor_of("hyprec.entrypoints.cli", FLOORS)
    assert here is not None and there is not None and there > here
