"""The folder rule: which part of the package may import which, and never back.

::

    cli -> bench -> api -+-> models -> layers ---------------+-> ops -> base
                         +-> backend -> patterns -> passes --+

An arrow says the part on its left may import the part on its right, and (transitively) all that
part may import; nothing else. The two stacks meet only in ``api``: the models and layers know
nothing of the compiler, and the compiler knows no model or layer class (a model's position bound,
for example, is declared by the layer: ``ops.step_inputs.PositionBounded``).

- ``patterns`` (each fusion: a ``PatternPass`` subclass) is built on ``passes`` (the pass
  framework, ``LayerpassPass`` and ``PatternPass``, and the generic passes); the pass list a
  ``CompilationConfig`` turns on, which picks from both, is the backend's (``backend/pieces/pass_list.py``).
- ``base`` is what every part reads: ``layerpass/envs.py`` (the environment), ``torch_compat.py``
  (what differs between torch versions), ``version.py``.
- ``api`` is the package root (``layerpass.compile``, ``CompilationConfig``, ... resolved lazily)
  and ``precompile.py``. The root runs on every ``import layerpass.<anything>``, so at module
  level it imports only ``base``; nothing below ``api`` imports it.

Every import statement counts (module level, inside a function, under ``TYPE_CHECKING``): a lazy
import is still a dependency, only a hidden one. The files are read with ``ast``, nothing is run.
A new module of ``layerpass/`` must be placed in ``PARTS`` (a new folder too): the test says so.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.import_graph import ROOT, Import, imports, module_files, package_dirs

# module (and everything under it) -> its part; the longest matching name wins. The package
# root ``layerpass`` names only itself: a module of layerpass/ not listed here is unplaced.
PARTS = {
    "layerpass.cli": "cli",
    "layerpass.__main__": "cli",
    "layerpass.bench": "bench",
    "layerpass": "api",
    "layerpass.precompile": "api",
    "layerpass.models": "models",
    "layerpass.layers": "layers",
    "layerpass.backend": "backend",
    "layerpass.patterns": "patterns",
    "layerpass.passes": "passes",
    "layerpass.ops": "ops",
    "layerpass.envs": "base",
    "layerpass.torch_compat": "base",
    "layerpass.version": "base",
    "layerpass.fingerprint": "base",
}

# the arrows of the drawing above: each part's direct lower neighbours
RULE = {
    "cli": {"bench"},
    "bench": {"api"},
    "api": {"models", "backend"},
    "models": {"layers"},
    "layers": {"ops"},
    "backend": {"patterns"},
    "patterns": {"passes"},
    "passes": {"ops"},
    "ops": {"base"},
    "base": set(),
}

ROOT_PACKAGE = "layerpass"


def reachable(rule: dict[str, set[str]]) -> dict[str, set[str]]:
    """Part -> every part below it (what it may import): the transitive closure of the arrows."""
    below: dict[str, set[str]] = {}

    def walk(part: str, path: tuple[str, ...]) -> set[str]:
        if part in path:
            raise ValueError(f"the rule has a cycle: {' -> '.join((*path, part))}")
        if part not in below:
            below[part] = set().union(*({p} | walk(p, (*path, part)) for p in rule[part]))
        return below[part]

    for part in rule:
        walk(part, ())
    return below


def part_of(module: str, parts: dict[str, str] = PARTS, root: str = ROOT_PACKAGE) -> str | None:
    """The part ``module`` belongs to, or None when no entry places it."""
    name = module
    while name:
        if name in parts and (name != root or module == root):
            return parts[name]
        name = name.rpartition(".")[0]
    return None


def rule_text(rule: dict[str, set[str]] = RULE) -> str:
    return "; ".join(f"{part} -> {', '.join(sorted(lower))}" for part, lower in rule.items() if lower)


def unplaced(modules: dict[str, Path], parts: dict[str, str] = PARTS, root: str = ROOT_PACKAGE) -> list[str]:
    return sorted(m for m in modules if part_of(m, parts, root) is None)


def broken_edges(modules: dict[str, Path], parts: dict[str, str] = PARTS,
                 rule: dict[str, set[str]] = RULE) -> list[tuple[Import, str, str]]:
    """Every import from one part into another that the rule does not allow: (import, from, to)."""
    allowed = reachable(rule)
    known = set(modules)
    found = []
    for module, path in sorted(modules.items()):
        src = part_of(module, parts)
        for imp in imports(module, path, known):
            dst = part_of(imp.target, parts)
            if src is not None and dst is not None and src != dst and dst not in allowed[src]:
                found.append((imp, src, dst))
    return found


def describe(edges: list[tuple[Import, str, str]], modules: dict[str, Path], root: Path = ROOT,
             rule: dict[str, set[str]] = RULE) -> str:
    allowed = reachable(rule)
    lines = [f"  {modules[imp.module].relative_to(root)}:{imp.line}: {src} -> {dst} ({imp.module} imports "
             f"{imp.target}); {src} may import only {', '.join(sorted(allowed[src])) or 'nothing of layerpass'}"
             for imp, src, dst in edges]
    return ("imports against the folder rule (tests/layerpass/test_folder_rule.py); move the shared piece "
            "down to a part both may import, or invert the dependency (a declaration or registration in the "
            "lower part); a lazy import still counts:\n" + "\n".join(lines) + f"\nthe rule: {rule_text(rule)}")


def test_the_rule_is_a_layering() -> None:
    """No cycle in the arrows, every part named in them is in ``PARTS``."""
    below = reachable(RULE)
    assert set(RULE) == set(PARTS.values())
    assert all(part not in lower for part, lower in below.items())
    assert below["cli"] == set(RULE) - {"cli"}, "the cli sits on top of everything"
    assert below["base"] == set()
    assert not {"backend", "passes", "patterns"} & (below["models"] | below["layers"])
    assert not {"models", "layers"} & below["backend"]


def test_every_module_is_placed() -> None:
    modules = module_files(package_dirs())
    assert "layerpass.ops.state" in modules and "layerpass.models.hf.convert" in modules  # the mapping was read
    assert not unplaced(modules), ("modules no entry of PARTS places (tests/layerpass/test_folder_rule.py): "
                                   f"{unplaced(modules)}; add each to the part it belongs to")


def test_no_import_goes_against_the_folder_rule() -> None:
    modules = module_files(package_dirs())
    edges = broken_edges(modules)
    assert not edges, describe(edges, modules)


def test_the_package_root_imports_only_base_at_import_time() -> None:
    """``import layerpass.ops`` runs ``layerpass/__init__.py`` first, so what the root imports at
    module level every part imports."""
    modules = module_files(package_dirs())
    eager = [i for i in imports(ROOT_PACKAGE, modules[ROOT_PACKAGE], set(modules)) if i.top_level]
    assert eager, "the root imports its envs flags"
    wrong = [i for i in eager if part_of(i.target) != "base"]
    assert not wrong, "\n".join(f"layerpass/__init__.py:{i.line}: imports {i.target} ({part_of(i.target)}) at "
                                f"import time; only base may be imported there (resolve it lazily)" for i in wrong)


def test_the_checker_finds_hidden_and_relative_back_edges(tmp_path: Path) -> None:
    """A lazy import, a ``TYPE_CHECKING`` import and a relative one up into another part are all
    found, with file and line; imports inside a part and down the rule are not."""
    pkg = tmp_path / "demo"
    for folder in ("low", "high"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "high" / "a.py").write_text("from demo.low import b\nfrom . import c\n")  # down, and inside
    (pkg / "high" / "c.py").write_text("")
    (pkg / "low" / "b.py").write_text("def f():\n    from demo.high import a\n    return a\n")
    (pkg / "low" / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..high.c import X\n")
    (pkg / "low" / "e.py").write_text("from ..high import c\n")
    modules = module_files({"demo": pkg})
    parts = {"demo": "top", "demo.high": "high", "demo.low": "low"}
    rule = {"top": {"high"}, "high": {"low"}, "low": set()}
    edges = broken_edges(modules, parts, rule)
    assert [(i.module, i.target, i.line, src, dst) for i, src, dst in edges] == [
        ("demo.low.b", "demo.high.a", 2, "low", "high"),
        ("demo.low.d", "demo.high.c", 3, "low", "high"),
        ("demo.low.e", "demo.high.c", 1, "low", "high"),
    ]
    message = describe(edges, modules, tmp_path, rule)
    assert "demo/low/b.py:2: low -> high (demo.low.b imports demo.high.a); low may import only nothing" in message
    assert "the rule: top -> high; high -> low" in message
    assert unplaced(modules, parts, root="demo") == []
    assert unplaced({**modules, "demo.other": pkg / "other.py"}, parts, root="demo") == ["demo.other"]  # root: itself only


def test_a_cycle_in_the_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="cycle: a -> b -> a"):
        reachable({"a": {"b"}, "b": {"a"}})
