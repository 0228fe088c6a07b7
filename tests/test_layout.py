"""The package's shape, held by tests: stage packages, no import cycle, thin commands, short functions.

The import graph is read from the source (every `import` and `from ... import`, at module level or
inside a function), so a cycle fails here before it can fail at run time."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "peftsmooth"
MAX_TOP_LEVEL_MODULES = 15
MAX_COMMAND_LINES = 200
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports anywhere in its file (a package's own name for `from pkg import X`
    when X is not a submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    graph = import_graph()
    assert "peftsmooth.certify.sequential" in graph["peftsmooth.certify.smoothing"]
    assert "peftsmooth.models" in graph["peftsmooth.runs"]  # imported inside load_run


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_stages_are_packages_and_the_top_level_is_small():
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    for stage in ("certify", "train", "report", "adapt", "front", "library", "commands"):
        assert (PACKAGE / stage / "__init__.py").is_file(), stage


def test_commands_are_thin():
    lengths = {p.name: len(p.read_text().splitlines()) for p in (PACKAGE / "commands").glob("*.py")}
    assert max(lengths.values()) <= MAX_COMMAND_LINES, lengths


def test_functions_fit_on_a_screen():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{module_name(path)}.{node.name}: {lines} lines")
    assert not long, long


def test_the_architecture_page_maps_every_module():
    """docs/architecture.md's module map names every module of the package (and no module that is gone)."""
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if path.name in ("__init__.py", "__main__.py"):
            continue
        if rel.startswith("commands/"):  # one thin app per command, mapped together
            assert "`commands/*.py`" in text and f"`{path.stem.replace('_', '-')}`" in text.replace("`import`", "`import-logs`"), rel
            continue
        assert f"`{rel}`" in text, f"docs/architecture.md does not map {rel}"
