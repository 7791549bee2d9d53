"""No two files of the package import each other.

A pair of modules importing each other (even from inside a function, or under ``TYPE_CHECKING``)
means neither owns the piece both need; the fix is to move it to one owner, not to hide the import.
The files are read with ``ast`` (nothing is imported); module names follow pyproject's
``package-dir``, so ``ops/state.py`` is ``layerpass.ops.state``."""

from __future__ import annotations

import ast
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


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


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The known modules ``module`` imports anywhere in its file (module level, functions,
    ``TYPE_CHECKING`` blocks). ``from p import x`` counts as importing ``p.x`` when that is a module."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
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
        found.update(t for t in (_resolve(name, known) for name in targets) if t is not None and t != module)
    return found


def mutual_imports(modules: dict[str, Path]) -> list[tuple[str, str]]:
    """Every pair of modules that import each other, sorted."""
    known = set(modules)
    graph = {name: imports_of(name, path, known) for name, path in modules.items()}
    return sorted((a, b) for a, targets in graph.items() for b in targets if a < b and a in graph.get(b, ()))


def test_no_two_package_files_import_each_other() -> None:
    modules = module_files(package_dirs())
    assert "layerpass.ops.state" in modules and "layerpass.models.hf.convert" in modules  # the mapping was read
    pairs = mutual_imports(modules)
    rel = {name: path.relative_to(ROOT) for name, path in modules.items()}
    assert not pairs, "files importing each other (move the shared piece to one owner):\n" + "\n".join(
        f"  {rel[a]} <-> {rel[b]}" for a, b in pairs)


def test_the_detector_finds_a_pair_inside_a_function(tmp_path: Path) -> None:
    pkg = tmp_path / "src"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from demo.a import g\n    return g\n")
    (pkg / "c.py").write_text("from .a import b as _\nimport demo.b\n")  # one way only: no pair
    modules = module_files({"demo": pkg})
    assert set(modules) == {"demo", "demo.a", "demo.b", "demo.c"}
    assert mutual_imports(modules) == [("demo.a", "demo.b")]
    assert imports_of("demo.c", modules["demo.c"], set(modules)) == {"demo.a", "demo.b"}
