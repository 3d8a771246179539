"""The house's import graph, read from the source (imports inside functions included): no circle,
the equations import nothing of the project, and the kernels take from microgpt only its
equations (microgpt/model.py) and its atomic file writes (microgpt/files.py, which imports nothing
of the project either), never the trainer or the model's kernel switch."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("microgpt", "kernels", "bench")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def _imported(name: str) -> str | None:
    """The project module an import names: itself, or the package that holds the name."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> set[str]:
    """The project modules `module` imports, anywhere in its file."""
    tree = ast.parse(MODULES[module].read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {_imported(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from package import submodule` imports the submodule; `from module import name`
            # the module.
            found |= {_imported(f"{node.module}.{alias.name}") for alias in node.names}
    return found - {None, module}


GRAPH = {module: imports(module) for module in MODULES}


def _circle_from(start: str) -> list[str] | None:
    """A path start -> ... -> start through GRAPH, if there is one."""
    stack, seen = [(start, [start])], set()
    while stack:
        module, path = stack.pop()
        for child in GRAPH[module]:
            if child == start:
                return path + [start]
            if child not in seen:
                seen.add(child)
                stack.append((child, path + [child]))
    return None


def test_the_graph_reads_the_known_arrows():
    """The reader sees imports at the top and inside functions (a check of the check)."""
    assert "microgpt.model" in GRAPH["kernels.attention.api"]
    assert "kernels" in GRAPH["microgpt.gpt"]
    assert "microgpt.run" in GRAPH["microgpt.generate"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_circle(module):
    assert _circle_from(module) is None, " -> ".join(_circle_from(module))


def test_the_equations_and_the_file_writes_import_nothing_of_the_project():
    assert GRAPH["microgpt.model"] == GRAPH["microgpt.files"] == set()


def test_kernels_take_only_the_equations_and_file_writes_from_microgpt():
    taken = {(module, target) for module, targets in GRAPH.items() if module.startswith("kernels")
             for target in targets if target.startswith("microgpt")}
    assert {target for _, target in taken} <= {"microgpt.model", "microgpt.files"}, sorted(taken)
