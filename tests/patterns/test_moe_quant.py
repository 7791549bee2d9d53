"""MoE quantised-input fusion: static FP8 quant -> ``moe_forward_fp8`` becomes ``moe_forward_quant_input``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from layerpass.layers import Fp8Config, FusedMoE
from layerpass.ops import encode_layer_name, layer_registry_scope, set_forward_context
from layerpass.ops import moe_quant  # the checked entry points (the raw ops do not check)
from layerpass.ops.quant import quantize_fp8
from tests.helpers import fusion as fh

lp = torch.ops.layerpass


def _layer(experts: int, top_k: int, hidden: int, inter: int, seed: int) -> tuple[FusedMoE, object]:
    from layerpass.layers import init_seed_scope

    with layer_registry_scope() as reg, init_seed_scope(seed):
        layer = FusedMoE(experts, top_k, hidden, inter, prefix="m.experts", quant_config=Fp8Config())
    return layer, reg


@settings(max_examples=8, deadline=None)
@given(experts=st.integers(2, 6), hidden=st.sampled_from([8, 16, 24]), inter=st.sampled_from([4, 8]),
       tokens=st.integers(1, 9), seed=st.integers(0, 1000), absmax=st.floats(0.5, 6.0))
def test_quant_input_op_equals_quant_then_fp8_moe(experts, hidden, inter, tokens, seed, absmax) -> None:
    layer, reg = _layer(experts, min(2, experts), hidden, inter, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g) * absmax
    logits = torch.randn(tokens, experts, generator=g)
    scale = layer.input_scale
    name = encode_layer_name("m.experts")
    with set_forward_context(None, reg):
        fused = torch.ops.layerpass.moe_forward_quant_input(x, scale, logits, name)
        unfused = torch.ops.layerpass.moe_forward_fp8(quantize_fp8(x, scale), scale, logits, name, x.dtype)
        # and against dequantised weights run through the float experts (an independent path)
        q = quantize_fp8(x, scale).float() * scale
        w13 = layer.w13_weight.float() * layer.w13_scale
        w2 = layer.w2_weight.float() * layer.w2_scale
    probs = torch.softmax(logits.float(), -1)
    w, ids = probs.topk(layer.top_k, -1)
    w = w / w.sum(-1, keepdim=True)
    ref = torch.zeros(tokens, hidden)
    for t in range(tokens):
        for j in range(layer.top_k):
            e = int(ids[t, j])
            h = w13[e] @ q[t]
            ref[t] += w[t, j] * (w2[e] @ (torch.nn.functional.silu(h[:inter]) * h[inter:]))
    assert torch.equal(fused, unfused)
    torch.testing.assert_close(fused, ref, atol=1e-4, rtol=1e-4)


def test_fp8_moe_ops_opcheck_and_errors() -> None:
    layer, reg = _layer(4, 2, 16, 8, 0)
    x, logits, name = torch.randn(3, 16), torch.randn(3, 4), encode_layer_name("m.experts")
    with set_forward_context(None, reg):
        torch.library.opcheck(torch.ops.layerpass.moe_forward_quant_input.default, (x, layer.input_scale, logits, name),
                              test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))
        with pytest.raises(ValueError, match="takes an .*float8"):
            moe_quant.moe_forward_fp8(x, layer.input_scale, logits, name, x.dtype)
        with pytest.raises(ValueError, match="one-element scale"):
            moe_quant.moe_forward_quant_input(x, torch.ones(2), logits, name)
    with layer_registry_scope() as plain_reg:
        plain = FusedMoE(4, 2, 16, 8, prefix="plain.experts")  # noqa: F841  (the registry holds it weakly)
    with set_forward_context(None, plain_reg), pytest.raises(ValueError, match="moe_forward_fp8 needs"):
        moe_quant.moe_forward_fp8(quantize_fp8(x, layer.input_scale), layer.input_scale, logits,
                                            encode_layer_name("plain.experts"), x.dtype)


@pytest.mark.slow
def test_moe_fp8_model_quant_input_fusion_covers_every_layer() -> None:
    # custom_ops=("all",): the norms stay the ops eager runs (lowered, Inductor's reduction order
    # differs in the last bits), so the output can be compared bit for bit
    run = fh.compile_recorded("moe-fp8", 2, custom_ops=("all",))
    r = run.report
    assert r.pass_failures == []
    assert r.matches["fuse_moe_quant_input"] == 2  # every MoE layer
    assert run.graphs, "the recorder saw no piece"
    for g in run.graphs:
        assert lp.moe_forward_fp8.default not in fh.op_counts(g)
    assert sum(fh.op_counts(g)[lp.moe_forward_quant_input.default] for g in run.graphs) == \
        r.matches_compiled["fuse_moe_quant_input"]
    assert torch.equal(run.out, run.ref)  # the fused op computes exactly the unfused chain
    unfused = fh.compile_recorded("moe-fp8", 2, fuse_moe=False, custom_ops=("all",))
    assert "fuse_moe_quant_input" not in unfused.report.matches
    assert any(fh.op_counts(g)[lp.moe_forward_fp8.default] for g in unfused.graphs)
    assert torch.equal(unfused.out, run.out)
