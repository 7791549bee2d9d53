"""No two files of the package import each other.

A pair of modules importing each other (even from inside a function, or under ``TYPE_CHECKING``)
means neither owns the piece both need; the fix is to move it to one owner, not to hide the import.
The files are read with ``ast`` (``tests/helpers/import_graph.py``: nothing is imported). Which
folder may import which is ``test_folder_rule.py``."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.import_graph import ROOT, imports_of, module_files, package_dirs


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
