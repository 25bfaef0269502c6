"""The structure drawn from the imports (README "Layout"): every import of the project's own modules, at the top of a
file or inside a function, read from the source. No module takes part in an import circle, and a package imports only
the packages below it:

    utils  <-  models  <-  prepare  <-  matconvnet
                                    <-  engine  <-  retrieval (search and the browser)
                                                <-  the entry points (train_stage1.py, train_stage2.py, evaluate.py)

(``bench/`` and ``tests/`` sit above everything and are not checked.)
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("utils", "models", "prepare", "matconvnet", "engine", "retrieval")
SCRIPTS = ("train_stage1", "train_stage2", "evaluate")
ALLOWED = {  # package -> the packages it may import (besides itself)
    "utils": set(),
    "models": {"utils"},
    "prepare": {"utils", "models"},
    "matconvnet": {"utils", "models", "prepare"},
    "engine": {"utils", "models", "prepare"},
    "retrieval": {"utils", "models", "prepare", "engine"},
    "scripts": {"utils", "models", "prepare", "engine"},
}


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the packages and the root scripts."""
    mods = {name: ROOT / f"{name}.py" for name in SCRIPTS}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).glob("*.py")):
            mods[pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"] = path
    return mods


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The project modules ``name`` imports: ``import a.b`` -> a.b; ``from a import b`` -> a.b when that is a module,
    else a; relative imports resolved against the package."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def layer(module: str) -> str:
    return "scripts" if module in SCRIPTS else module.split(".")[0]


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_reader_sees_every_module_and_its_imports():
    edges = graph()
    assert {"utils.cli", "models.spec", "prepare.pipeline", "matconvnet.convert", "engine.loop",
            "evaluate"} <= set(edges)
    assert "models.spec" in edges["matconvnet.layout"] and "prepare.matfile" in edges["prepare.dictionary"]  # lazy too
    assert "models.spec" in edges["models.text_cnn"]  # relative: from . import spec
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the search finds a circle


def test_no_import_circle():
    assert find_cycle(graph()) is None, " -> ".join(find_cycle(graph()) or [])


def test_imports_run_one_way_down_the_layers():
    upward = sorted(f"{m} imports {n}" for m, targets in graph().items() for n in targets
                    if layer(n) != layer(m) and layer(n) not in ALLOWED[layer(m)])
    assert upward == [], upward
