"""No import cycle anywhere in code/: every module is read with ``ast`` (nothing is imported or run).

An edge A -> B means module A names project module B in an import statement, at top level or inside a
function (a function-level import is a cycle postponed, not removed). ``from pkg import name`` points at
``pkg.name`` when that is a module, else at ``pkg``. Importing a submodule also runs its package's
``__init__``, but that implicit step is not an edge: Python finishes a parent package before its children.
"""
from __future__ import annotations

import ast
from pathlib import Path

CODE = Path(__file__).resolve().parents[1]


def project_modules(root: Path = CODE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under ``root`` (packages by their __init__.py)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        if parts:
            modules[".".join(parts)] = path
    return modules


def _imported_modules(tree: ast.AST, module: str, is_package: bool, modules: dict) -> set[str]:
    """The project modules this module's import statements point at (relative ones resolved)."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".") if package else []
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                found.add(sub if sub in modules else base)
    return {name for name in found if name in modules and name != module}


def import_graph(root: Path = CODE) -> dict[str, set[str]]:
    """Project module -> the project modules it imports (see the module docstring for what an edge is)."""
    modules = project_modules(root)
    return {name: _imported_modules(ast.parse(path.read_text(), filename=str(path)), name,
                                    path.name == "__init__.py", modules)
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_project_imports_at_every_level():
    graph = import_graph()
    assert "utils.io" in graph["utils.inference"]                       # top-level absolute import
    assert "networks.sam_med3d.build" in graph["networks.sam_med3d.checkpoint"]   # relative import
    assert "dataloaders.la_heart" in graph["utils.compare"]              # inside a function
    assert "training.demo_recipe" in graph["demo"] and "training.demo_recipe" in graph["study_generalist"]
    assert "torch" not in graph["utils.io"]                              # third-party names are not nodes


def test_find_cycle_names_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_relative_and_function_level_imports_make_edges(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("def f():\n    from . import b\n    return b\n")
    (pkg / "b.py").write_text("from pkg.a import f\n")
    graph = import_graph(tmp_path)
    assert graph["pkg"] == {"pkg.a"} and graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]


def test_no_import_cycle_in_code():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_demo_and_the_study_share_their_recipe_through_a_package():
    # two scripts running one recipe: it lives in training.demo_recipe, and neither script imports a script
    graph = import_graph()
    scripts = {name for name in graph if "." not in name and (CODE / f"{name}.py").is_file()}
    for name in ("demo", "study_generalist", "eval_generalist"):
        assert not graph[name] & scripts, (name, sorted(graph[name] & scripts))
