"""The package's layers: each folder is a layer, and imports only go down.

    errors < config < distributed < components < engine < trainer < tools < commands

Read from the source (every `import` and `from ... import`, also inside functions), so a
lazy import that climbs is found as well. Also: no import circle among modules."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "distrain"
LAYERS = ["errors", "config", "distributed", "components", "engine", "trainer", "tools",
          "commands"]


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """{module: the distrain modules it imports}."""
    found: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        module, names = _module(path), set()
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names if a.name.startswith("distrain")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                    + ([base] if base else []))
                if base.startswith("distrain"):
                    names.add(base)
                    names |= {f"{base}.{a.name}" for a in node.names}
        found[module] = names
    return {m: {n for n in names if n in found and n != m} for m, names in found.items()}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_layers_only_import_downwards():
    climbs = sorted(f"{m} imports {n}" for m, names in _imports().items() for n in names
                    if _layer(m) is not None and _layer(n) is not None
                    and _layer(n) > _layer(m))
    assert climbs == []
    # Each layer folder says what it holds and who may import it.
    for layer in LAYERS:
        init = SRC / layer / "__init__.py"
        if init.exists():
            assert ast.get_docstring(ast.parse(init.read_text())), f"{init} has no docstring"


def test_no_import_circle():
    graph = _imports()
    circles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                circles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert circles == []
