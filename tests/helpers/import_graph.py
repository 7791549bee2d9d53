"""The package's import graph, read with ``ast`` (nothing is imported).

Module names follow pyproject's ``package-dir``, so ``ops/state.py`` is ``layerpass.ops.state``.
Every import statement counts: module level, inside functions (lazy imports), under
``TYPE_CHECKING``; relative imports are resolved. Used by ``tests/layerpass/test_import_graph.py``
(no two files import each other) and ``tests/layerpass/test_folder_rule.py`` (the folder layers)."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Import:
    """One import statement's edge: ``module`` (at ``line`` of its file) imports ``target``."""

    module: str
    target: str
    line: int
    top_level: bool  # at module level (runs on import), not inside a function or class body


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """Package name -> its folder, from pyproject's ``package-dir`` (subpackages are found by walking)."""
    mapping = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {pkg: root / folder for pkg, folder in mapping.items()}


def module_files(dirs: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the mapped folders."""
    modules: dict[str, Path] = {}
    for pkg, folder in dirs.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([pkg, *parts])] = path
    return modules


def _resolve(name: str, known: set[str]) -> str | None:
    """The known module ``name`` names, or the closest known package above it (``a.b.f`` where
    ``f`` is a function of ``a.b``); None outside the known modules."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _nodes_with_scope(tree: ast.Module):
    """Every node with whether it is at module level (``if``/``try`` blocks included, function and
    class bodies not)."""
    todo: list[tuple[ast.AST, bool]] = [(tree, True)]
    while todo:
        node, top = todo.pop()
        yield node, top
        nested = top and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef))
        todo.extend((child, nested) for child in ast.iter_child_nodes(node))


def imports(module: str, path: Path, known: set[str]) -> list[Import]:
    """The known modules ``module`` imports anywhere in its file, one entry per statement and target.
    ``from p import x`` imports ``p.x`` when that is a module, else ``p``."""
    is_package = path.name == "__init__.py"
    found: list[Import] = []
    for node, top in _nodes_with_scope(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in targets:
            target = _resolve(name, known)
            if target is not None and target != module:
                found.append(Import(module, target, node.lineno, top))
    return sorted(set(found), key=lambda i: (i.line, i.target))


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The set of known modules ``module`` imports (``imports`` without the lines)."""
    return {i.target for i in imports(module, path, known)}
