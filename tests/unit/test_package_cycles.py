"""No cycle between the packages of bmig/.

A package here is a direct child of bmig/: a sub-package (``bmig/nbd/``, ``bmig/wire/``,
...) or a top-level module (``bmig/errors.py``). Every import counts, wherever it
stands: at the top of a module, inside a function, under ``if TYPE_CHECKING``, relative
or absolute. A function-level import does not make a cycle go away, it only hides it
until the first call; so the imports are read from the source with ast, not from
``sys.modules``.
"""

from __future__ import annotations

import ast
import pathlib
from collections import defaultdict

import bmig

ROOT = pathlib.Path(bmig.__file__).resolve().parent

Edges = dict[str, dict[str, list[str]]]      # package -> package it imports -> where


def package_of(path: pathlib.Path, root: pathlib.Path) -> str:
    """The direct child of ``root`` that holds ``path`` (``__init__`` for the root's own)."""
    first = path.relative_to(root).parts[0]
    return first[:-3] if first.endswith(".py") else first


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    """Dotted names every import of ``tree`` may load, with their line: for
    ``from a import b`` both ``a`` and ``a.b`` (b may be a module)."""
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if is_package else 0)
                base = ".".join(parts[:keep] + ([base] if base else []))
            found.append((base, node.lineno))
            found.extend((f"{base}.{alias.name}", node.lineno) for alias in node.names)
    return found


def import_edges(root: pathlib.Path) -> Edges:
    name = root.name
    edges: Edges = defaultdict(lambda: defaultdict(list))
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        is_package = rel.name == "__init__"
        module = ".".join(rel.parts[:-1] if is_package else rel.parts)
        source = package_of(path, root)
        tree = ast.parse(path.read_text(), str(path))
        for dotted, line in imported_modules(tree, module, is_package):
            parts = dotted.split(".")
            if parts[0] != name or len(parts) < 2:
                continue
            target = parts[1]
            if not ((root / target).is_dir() or (root / f"{target}.py").is_file()):
                continue            # a name from bmig/__init__.py, such as __version__
            where = f"{path.relative_to(root.parent)}:{line}"
            if target != source and where not in edges[source][target]:
                edges[source][target].append(where)
    return edges


def cycles(edges: Edges) -> list[list[str]]:
    """The strongly connected components with more than one package (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, {})):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    nodes = set(edges) | {t for targets in edges.values() for t in targets}
    for node in sorted(nodes):
        if node not in index:
            visit(node)
    return found


def describe(edges: Edges, component: list[str]) -> str:
    lines = [" <-> ".join(component) + ":"]
    for source in component:
        for target in component:
            for where in edges.get(source, {}).get(target, []):
                lines.append(f"  {source} -> {target}  ({where})")
    return "\n".join(lines)


def test_no_package_of_bmig_imports_one_that_imports_it_back():
    edges = import_edges(ROOT)
    found = cycles(edges)
    assert not found, "package cycles in bmig/:\n" + "\n".join(describe(edges, c)
                                                                 for c in found)


# -- the check itself, on a tree made for it ------------------------------------------------


def make_tree(tmp_path: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    root = tmp_path / "pkg"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_function_level_import_makes_a_cycle_too(tmp_path):
    root = make_tree(tmp_path, {
        "__init__.py": "",
        "a/__init__.py": "",
        "a/x.py": "from pkg.b.y import f\n",
        "b/__init__.py": "",
        "b/y.py": "def f():\n    from pkg.a import x\n    return x\n",
    })
    assert cycles(import_edges(root)) == [["a", "b"]]


def test_relative_and_type_checking_imports_count(tmp_path):
    root = make_tree(tmp_path, {
        "__init__.py": "",
        "errors.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                     "    from .a.x import C\n",
        "a/__init__.py": "",
        "a/x.py": "from ..errors import E\nclass C: ...\n",
    })
    assert cycles(import_edges(root)) == [["a", "errors"]]


def test_imports_inside_one_package_and_of_the_root_are_no_cycle(tmp_path):
    root = make_tree(tmp_path, {
        "__init__.py": "__version__ = '1'\n",
        "a/__init__.py": "",
        "a/x.py": "from pkg import __version__\nfrom pkg.a import y\nfrom pkg.b import z\n",
        "a/y.py": "from pkg.a import x\n",
        "b/__init__.py": "",
        "b/z.py": "import os\n",
    })
    assert cycles(import_edges(root)) == []
