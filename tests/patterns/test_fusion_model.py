"""Issue 5's acceptance on full compiles of zoo models (``"layers"`` split).

Compiles are shared through module-scoped fixtures (each costs tens of seconds on the shared CPU
box, hence ``slow``). The 6-layer model reuses the 2-layer model's Inductor artifacts (same piece
structure), which is exactly the property under test: coverage (``matches``) grows with layers,
work (``matches_compiled``) does not.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers import backend as bh
from tests.helpers import fusion as fh

pytestmark = pytest.mark.slow

# unfused and not lowered (custom_ops=("all",)): every producer -> quant chain stays as op nodes to find
UNFUSED = {"fuse_attn_quant": False, "fuse_norm_quant": False, "fuse_act_quant": False, "fuse_moe": False,
           "custom_ops": ("all",)}
lp = torch.ops.layerpass
ATTN = lp.unified_attention_with_output.default


@pytest.fixture(scope="module")
def fused2() -> bh.Compiled:
    return fh.compile_recorded("llama-fp8", 2)


@pytest.fixture(scope="module")
def fused6(fused2) -> bh.Compiled:  # after fused2: its pieces come from Inductor's cache
    return fh.compile_recorded("llama-fp8", 6)


@pytest.fixture(scope="module")
def unfused2() -> bh.Compiled:
    return fh.compile_recorded("llama-fp8", 2, **UNFUSED)


@pytest.fixture(scope="module")
def moe3() -> bh.Compiled:
    return fh.compile_recorded("moe", 3)


def test_llama_fp8_coverage_grows_with_layers_work_does_not(fused2, fused6) -> None:
    for run, layers in ((fused2, 2), (fused6, 6)):
        r = run.report
        assert r.pass_failures == []
        assert r.matches["fuse_attn_quant"] == layers
        assert r.matches["fuse_act_quant"] == layers
        assert r.matches["fuse_norm_quant"] == 2 * layers  # input and post-attention norms
    for name in ("fuse_attn_quant", "fuse_norm_quant", "fuse_act_quant"):
        assert fused6.report.matches_compiled[name] == fused2.report.matches_compiled[name] > 0, name
    assert fused6.report.num_unique_pieces == fused2.report.num_unique_pieces


def test_no_unfused_quant_left(fused2, unfused2) -> None:
    assert len(fused2.graphs) == fused2.report.num_compiled > 0, "the recorder missed pieces: the test proves nothing"
    producers = (ATTN, lp.rms_norm.default, lp.fused_add_rms_norm.default, lp.silu_and_mul.default)
    # the same check on the unfused compile finds every chain (so it can fail)
    found = {p: sum(len(fh.quants_fed_by(g, p)) for g in unfused2.graphs) for p in producers}
    # one piece serves both layers (the first layer's residual is a zero): its norms are both fused_add_rms_norm
    assert found == {ATTN: 1, lp.rms_norm.default: 0, lp.fused_add_rms_norm.default: 2, lp.silu_and_mul.default: 1}
    for g in fused2.graphs:
        counts = fh.op_counts(g)
        assert not fh.has_auto_functionalized(g)
        assert all(fh.quants_fed_by(g, p) == [] for p in producers)
        assert counts[lp.static_scaled_fp8_quant.default] == 0  # every quant of llama-fp8 follows one of them
        for n in g.nodes:
            if n.target is ATTN:
                assert n.kwargs["output_scale"] is not None and n.kwargs["output"].meta["val"].dtype == torch.float8_e4m3fn
    for g in unfused2.graphs:
        assert not fh.has_auto_functionalized(g)


def test_fused_matches_eager_and_unfused(fused2, fused6, unfused2) -> None:
    for run in (fused2, fused6, unfused2):
        torch.testing.assert_close(run.out, run.ref, **fh.fp8_model_tolerance(run.ref))
    assert torch.equal(fused2.ref, unfused2.ref)  # same weights and step
    torch.testing.assert_close(fused2.out, unfused2.out, **fh.fp8_model_tolerance(unfused2.out))


def test_moe_shared_expert_fusion_covers_every_layer(moe3) -> None:
    r = moe3.report
    assert r.pass_failures == [] and r.matches["fuse_moe"] == 3
    assert moe3.graphs, "the recorder saw no piece"
    for g in moe3.graphs:
        counts = fh.op_counts(g)
        assert lp.moe_forward.default not in counts and not fh.has_auto_functionalized(g)
    assert sum(fh.op_counts(g)[lp.moe_forward_shared.default] for g in moe3.graphs) == r.matches_compiled["fuse_moe"]
    bh.assert_matches(moe3.out, moe3.ref, "fused moe")


# ----------------------------------------------------------------------------- a failing pattern


class NormQuant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from layerpass.layers import RMSNorm

        self.norm = RMSNorm(32, 1e-6, prefix="broken.norm")
        self.scale = nn.Parameter(torch.tensor([0.02]), requires_grad=False)

    def forward(self, x):
        q = torch.empty(x.shape, dtype=torch.float8_e4m3fn)
        torch.ops.layerpass.static_scaled_fp8_quant(q, self.norm(x), self.scale)
        return q.float() * self.scale


def test_failing_pattern_never_breaks_the_compile() -> None:
    """A pattern whose replacement raises while the matcher applies it: the pass is skipped for the
    piece (graph restored), the failure is reported, the passes after it still run."""
    from layerpass.backend.pieces.compiler import LayerpassBackend
    from layerpass.backend.config import CompilationConfig
    from layerpass.backend.report.compile_report import last_compile_report
    from layerpass.patterns import norm_quant

    class Broken(norm_quant.NormQuantFusionPass):
        name = "broken_norm_quant"

        def register_patterns(self) -> None:
            def replacement(x, weight, scale, eps):
                raise RuntimeError("replacement exploded")

            self.register(norm_quant.rms_norm_quant_pattern, replacement, lambda: norm_quant.norm_example_inputs(False),
                          scalar_workaround=norm_quant.SCALARS)

    m = NormQuant()
    x = torch.randn(6, 32)
    backend = LayerpassBackend(CompilationConfig(cache_dir=bh.fresh_cache_dir("broken"), disable_cache=True))
    backend.pass_manager.add_pass(Broken(), after="noop_elimination")
    with torch.no_grad():
        out = torch.compile(m, backend=backend, dynamic=False)(x)
        ref = m(x)
    torch.compiler.reset()
    r = last_compile_report()
    assert len(r.pass_failures) == 1 and "broken_norm_quant" in r.pass_failures[0] and "exploded" in r.pass_failures[0]
    assert r.matches["fuse_norm_quant"] == 1  # the real pass after it fused the restored graph
    assert torch.equal(out, ref)
