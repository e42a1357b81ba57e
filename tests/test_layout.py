"""The shape the design asks for: no import cycle among gptjax's modules (function-local imports
count), no file over 450 lines, no function over 80, at most 12 top-level modules (the rest live in
a folder per job), and docs/design.md naming every module."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gptjax"
DESIGN = PACKAGE.parent / "docs" / "design.md"
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80
MAX_TOP_LEVEL_MODULES = 12


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the gptjax modules it imports anywhere in its file."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        # A package's __init__ runs before its submodules: that edge is not a cycle.
        graph[name] = {d for d in deps if not d.startswith(name + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep, path + [dep])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [node])):
            return found
    return None


def test_no_import_cycle() -> None:
    modules = _modules()
    assert "gptjax.train.trainer" in modules and "gptjax.data.cache" in modules
    assert find_cycle(import_graph(modules)) is None, find_cycle(import_graph(modules))


def test_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_files_and_functions_are_short() -> None:
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            long.append(f"{path.name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name}: {size} lines")
    assert not long, long


def test_few_top_level_modules_and_a_folder_per_job() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert {"config", "model", "data", "train", "decode", "serve", "eval", "hf", "bench"} <= folders
    # The presets ship inside the package (package data), so preset names work from a wheel.
    assert (PACKAGE / "config" / "presets" / "gpt3-small.yaml").is_file()


def test_design_doc_names_every_module() -> None:
    """docs/design.md's layout table has a row per folder naming each of its modules, so a
    newcomer finds every concern's home from that page."""
    text = DESIGN.read_text(encoding="utf-8")
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.name in ("__init__.py", "__main__.py"):
            continue
        folder = f"{rel.parent.as_posix()}/" if rel.parent.parts else ""
        # `folder/` on the row and the file name in backticks on the same row.
        rows = [line for line in text.splitlines() if line.startswith("|")
                and (not folder or f"`{folder}`" in line)]
        if not any(f"`{rel.name}`" in row for row in rows):
            missing.append(rel.as_posix())
    assert not missing, f"docs/design.md's layout table does not name: {missing}"
