"""The package's layering (docs/architecture.md): no module imports from a layer above its own.

Read from the source with ``ast`` (type-only imports count too), so the rule holds for every
module whether or not a test imports it.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "lightning_compress"

#: module prefix -> layer (the longest matching prefix wins); higher layers may import lower ones
LAYERS = {
    "compressors": 0,
    "feedback": 0,
    "state": 0,
    "_compat": 0,
    "_lightning": 0,
    "examples": 0,
    "policies.forecast": 0,
    "comm": 1,
    "policies": 1,
    "exchange": 2,
    "metrics": 2,
    "summary": 2,
    "hooks": 3,
    "sync": 3,
    "strategy": 4,
    "callback": 4,
    "fingerprint": 4,
    "checkpoint_schema": 4,
    "stock_ddp": 4,
    "policies.driver": 4,
    "lightning": 5,
    "cli": 5,
    "": 6,  # the package's __init__
}


def _name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".") or p == ""), key=len)
    return LAYERS[best]


def _imports(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_compress"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lightning_compress")}
    return {m.removeprefix("lightning_compress").removeprefix(".") for m in found}


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    unknown = [_name(p) for p in MODULES if _name(p) and _layer(_name(p)) == LAYERS[""]]
    assert not unknown, f"modules with no layer in LAYERS (add them, see docs/architecture.md): {unknown}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _name(p) or "__init__")
def test_no_import_from_a_layer_above(path):
    me = _name(path)
    upward = [m for m in _imports(path) if m and _layer(m) > _layer(me)]
    assert not upward, f"{me or '__init__'} (layer {_layer(me)}) imports from above: {upward}"


def test_sync_does_not_import_the_strategy():
    for path in (PACKAGE / "sync").glob("*.py"):
        assert "strategy" not in _imports(path), f"{_name(path)} imports strategy.py"


def test_no_import_cycles():
    graph = {_name(p): {m for m in _imports(p) if m} for p in MODULES}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep] if dep in stack else [node, dep]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_the_rule_catches_an_upward_import(tmp_path):
    # the check itself can fail: a hook importing the strategy is reported
    fake = tmp_path / "hooks.py"
    fake.write_text("from lightning_compress.strategy import CompressedDDP\n")
    assert _layer("strategy") > _layer("hooks")
    assert "strategy" in _imports(fake)
