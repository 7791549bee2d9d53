"""``LayerpassPass.uuid()`` covers what matching depends on: the pass's module and, transitively,
every module it imports from its own top-level package or from ``layerpass`` (pattern modules,
``patterns/common.py``, the pattern-pass base, helper modules). Editing any of them changes the
uuid, hence Inductor's cache key and layerpass's (``PassManager.uuid()`` is in every piece key),
so a piece compiled with the old code is rebuilt, never served.

Out-of-tree passes are written as small packages in ``tmp_path``; the in-tree pattern modules are
edited only as copies.
"""

from __future__ import annotations

import importlib
import shutil
import sys
import uuid as uuid_mod
from pathlib import Path

import pytest
import torch

import layerpass.patterns.act_quant
from layerpass.backend.config import CompilationConfig
from layerpass.backend.pieces.pass_list import configure
from layerpass.passes.pattern_pass import PatternPass
from tests.helpers import backend as bh

OOT_PASS = '''\
from torch import fx

from layerpass.passes.base import LayerpassPass

from {pkg} import helper


class CountRelu(LayerpassPass):
    """Counts what ``helper.matches`` accepts; changes nothing."""

    name = "oot_count_relu"

    def apply(self, graph: fx.Graph) -> int:
        return sum(1 for n in graph.nodes if helper.matches(n))
'''

OOT_HELPER = '''\
import torch


def matches(node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.aten.relu.default
'''


class OotPackage:
    """A throw-away top-level package on ``sys.path`` with an out-of-tree pass and its helper."""

    def __init__(self, root: Path) -> None:
        self.name = f"lp_oot_{uuid_mod.uuid4().hex[:10]}"
        self.dir = root / self.name
        self.dir.mkdir()
        (self.dir / "__init__.py").write_text("")
        (self.dir / "helper.py").write_text(OOT_HELPER)
        (self.dir / "fusion.py").write_text(OOT_PASS.format(pkg=self.name))
        self.module = importlib.import_module(f"{self.name}.fusion")

    def edit_helper(self, text: str) -> None:
        """Rewrite the helper module and reload it and the pass module that imports it."""
        (self.dir / "helper.py").write_text(text)
        importlib.invalidate_caches()
        importlib.reload(sys.modules[f"{self.name}.helper"])
        self.module = importlib.reload(self.module)

    def new_pass(self):
        return self.module.CountRelu()


@pytest.fixture
def oot(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    pkg = OotPackage(tmp_path)
    yield pkg
    for name in [m for m in sys.modules if m == pkg.name or m.startswith(pkg.name + ".")]:
        del sys.modules[name]


def test_oot_uuid_covers_the_helper_module(oot) -> None:
    p = oot.new_pass()
    # the pass base imports the fingerprint module (layerpass core): its source counts too
    assert p.hashed_modules() == sorted([f"{oot.name}.fusion", f"{oot.name}.helper", "layerpass.passes.base",
                                         "layerpass.fingerprint"])
    before = p.uuid()
    assert oot.new_pass().uuid() == before  # stable
    oot.edit_helper(OOT_HELPER.replace("relu", "gelu"))
    assert oot.new_pass().uuid() != before, "the helper the pass matches with was left out of its uuid"


def test_unrelated_modules_do_not_count(oot, tmp_path) -> None:
    """A module of another top-level package (not layerpass) imported by the pass is not hashed,
    and the package's own modules the pass never imports are not either."""
    other = f"{oot.name}_other"
    (tmp_path / f"{other}.py").write_text("VALUE = 1\n")
    (oot.dir / "unused.py").write_text("VALUE = 2\n")
    oot.edit_helper(f"import {other}\n" + OOT_HELPER)
    assert other not in oot.new_pass().hashed_modules()
    before = oot.new_pass().uuid()
    (tmp_path / f"{other}.py").write_text("VALUE = 3\n")
    (oot.dir / "unused.py").write_text("VALUE = 4\n")
    assert oot.new_pass().uuid() == before
    del sys.modules[other]


def _pattern_passes():
    return [p for p in configure(CompilationConfig()) if isinstance(p, PatternPass)]


def test_in_tree_fusions_hash_their_pattern_module_common_and_the_base() -> None:
    passes = _pattern_passes()
    assert {p.name for p in passes} == {"fuse_attn_quant", "fuse_norm_quant", "fuse_act_quant", "fuse_moe",
                                        "fuse_moe_quant_input"}
    for p in passes:
        hashed = p.hashed_modules()
        for needed in (type(p).__module__, "layerpass.patterns.common", "layerpass.passes.pattern_pass",
                       "layerpass.passes.base", "layerpass.ops.library", "layerpass.envs"):
            assert needed in hashed, (p.name, needed)
        others = {type(q).__module__ for q in passes} - {type(p).__module__}
        assert not others & set(hashed), f"{p.name} hashes another fusion's module"


def test_editing_a_copied_pattern_module_changes_the_uuid(tmp_path, monkeypatch) -> None:
    """``patterns/act_quant.py`` copied into a package of its own: its uuid covers the copy, and
    through it ``patterns/common.py`` and the base; editing the copy's pattern changes it."""
    pkg = f"lp_copy_{uuid_mod.uuid4().hex[:10]}"
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "__init__.py").write_text("")
    copy = tmp_path / pkg / "act_quant.py"
    shutil.copy(layerpass.patterns.act_quant.__file__, copy)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        module = importlib.import_module(f"{pkg}.act_quant")
        p = module.ActQuantFusionPass()
        assert {f"{pkg}.act_quant", "layerpass.patterns.common", "layerpass.passes.pattern_pass"} <= set(p.hashed_modules())
        before = p.uuid()
        source = copy.read_text()
        edited = source.replace("torch.empty(5, 32)", "torch.empty(7, 32)")
        assert edited != source, "the copied pattern module changed shape: update this test's edit"
        copy.write_text(edited)
        importlib.invalidate_caches()
        module = importlib.reload(module)
        assert module.ActQuantFusionPass().uuid() != before
    finally:
        for name in [m for m in sys.modules if m.startswith(pkg)]:
            del sys.modules[name]


def test_hashed_modules_do_not_depend_on_what_is_imported(oot) -> None:
    """Imports are resolved from the source, not from ``sys.modules``: a module the pass imports only
    inside a function that never ran is hashed; a submodule that something else imported (so it is an
    attribute of its package) but the pass never names is not. Otherwise a warm start, which imports
    less, would compute other keys than the cold run."""
    (oot.dir / "lazy.py").write_text("LIMIT = 3\n")
    (oot.dir / "extra.py").write_text("EXTRA = 1\n")
    oot.edit_helper(OOT_HELPER + f"\n\ndef limit():\n    from {oot.name} import lazy\n    return lazy.LIMIT\n\n"
                    f"import {oot.name}  # the package itself\n")
    assert f"{oot.name}.lazy" not in sys.modules
    before = oot.new_pass().hashed_modules()
    assert {f"{oot.name}.lazy", oot.name} <= set(before)
    importlib.import_module(f"{oot.name}.extra")  # now an attribute of the package
    assert oot.new_pass().hashed_modules() == before and f"{oot.name}.extra" not in before


# ---------------------------------------------------------------- the cache key: an edit rebuilds


class ReluScale(torch.nn.Module):
    """One piece (no layer list to split at): the cheapest compile that still has a relu to count."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) * 2


def _compile(cache_dir: str, extra_pass):
    """``ReluScale`` through ``torch.compile`` with a layerpass backend that has ``extra_pass`` added."""
    from layerpass.backend.pieces.compiler import LayerpassBackend
    from layerpass.backend.report.compile_report import last_compile_report

    torch.compiler.reset()
    model, x = ReluScale(), torch.randn(5, 8)
    backend = LayerpassBackend(CompilationConfig(cache_dir=cache_dir))
    backend.pass_manager.add_pass(extra_pass, before="dead_code_elimination")
    with torch.no_grad():
        bh.assert_matches(torch.compile(model, backend=backend, dynamic=False)(x), model(x), "with an out-of-tree pass")
    torch.compiler.reset()
    return last_compile_report(), backend.pass_manager.uuid()


def test_editing_a_pass_helper_rebuilds_cached_pieces(oot) -> None:
    cache_dir = bh.fresh_cache_dir("uuid-edit")
    cold, uuid_cold = _compile(cache_dir, oot.new_pass())
    assert cold.num_compiled == cold.num_unique_pieces == 1 and cold.matches["oot_count_relu"] == 1
    warm, uuid_warm = _compile(cache_dir, oot.new_pass())
    assert uuid_warm == uuid_cold
    assert (warm.num_compiled, warm.num_cache_hits) == (0, cold.num_unique_pieces)

    oot.edit_helper(OOT_HELPER + "\n# an edit that changes no behaviour still changes the source\n")
    edited, uuid_edited = _compile(cache_dir, oot.new_pass())
    assert uuid_edited != uuid_cold
    assert edited.num_cache_hits == 0 and edited.num_compiled == cold.num_unique_pieces
    assert {p.key for p in edited.pieces}.isdisjoint({p.key for p in cold.pieces})
