"""Fix functionalization: ``auto_functionalized`` calls become in-place calls when that is exactly
equivalent (every mutated buffer a fresh allocation used only there), and stay otherwise.

Graphs come from ``tests.helpers.fusion.capture_graph`` (the backend's functionalization settings); the
rewritten graph must compute the same values as the functional one and as eager.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tests.helpers import fusion as fh
from layerpass.layers import Attention
from layerpass.ops import FP8_DTYPE, LayerRegistry, build_batch_metadata, layer_registry_scope, set_forward_context
from layerpass.passes.fix_functionalization import FixFunctionalizationPass

QUANT = torch.ops.layerpass.static_scaled_fp8_quant.default


class QuantChain(nn.Module):
    """Two out-variant quants into fresh buffers (both fixable)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([scale]), requires_grad=False)

    def forward(self, x: torch.Tensor):
        a = torch.empty(x.shape, dtype=FP8_DTYPE)
        torch.ops.layerpass.static_scaled_fp8_quant(a, x, self.scale)
        b = torch.empty(x.shape, dtype=FP8_DTYPE)
        torch.ops.layerpass.static_scaled_fp8_quant(b, x * 2, self.scale)
        return a, b


@settings(max_examples=5, deadline=None)
@given(st.integers(1, 8), st.integers(1, 40), st.sampled_from([0.01, 0.5]))
def test_fresh_buffers_become_in_place(tokens, hidden, scale) -> None:
    m = QuantChain(scale)
    x = torch.randn(tokens, hidden)
    eager = m(x)
    cap = fh.capture_graph(m, [x])
    assert fh.op_counts(cap.gm.graph)[fh.functionalized(QUANT)] == 2
    fixed, matches = fh.apply_passes(cap.gm, [FixFunctionalizationPass()])
    assert matches == {"fix_functionalization": 2}
    assert not fh.has_auto_functionalized(fixed.graph)
    assert fh.op_counts(fixed.graph)[QUANT] == 2
    for a, b in zip(cap.run(fixed), eager):
        assert torch.equal(fh.fp8_bits(a), fh.fp8_bits(b))


def test_attention_becomes_in_place() -> None:
    registry = LayerRegistry("ff")
    with layer_registry_scope(registry):
        attn = Attention(4, 16, 0.25, 2, prefix="model.layers.0.self_attn.attn")
    md = build_batch_metadata([3, 2], [0, 0], [[0], [1]], attn.cache_config.block_size)
    q, k, v = torch.randn(5, 64), torch.randn(5, 32), torch.randn(5, 32)
    with set_forward_context(md, registry):
        eager = attn(q, k, v)
    cap = fh.capture_graph(attn, [q, k, v], metadata=md, registry=registry)
    fixed, matches = fh.apply_passes(cap.gm, [FixFunctionalizationPass()])
    assert matches == {"fix_functionalization": 1} and not fh.has_auto_functionalized(fixed.graph)
    with set_forward_context(md, registry):
        torch.testing.assert_close(cap.run(fixed), eager, atol=0, rtol=0)


class MutatesInput(nn.Module):
    """The op writes a buffer the caller passed in: not a fresh allocation, so it must stay functional
    (functionalization copies the result back into the input)."""

    def forward(self, out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor):
        torch.ops.layerpass.static_scaled_fp8_quant(out, x, scale)
        return x + 1


def test_graph_input_buffer_is_left_functional() -> None:
    x, scale = torch.randn(4, 8), torch.tensor([0.05])
    out_eager = torch.empty(4, 8, dtype=FP8_DTYPE)
    MutatesInput()(out_eager, x, scale)
    cap = fh.capture_graph(MutatesInput(), [torch.empty(4, 8, dtype=FP8_DTYPE), x, scale])
    fixed, matches = fh.apply_passes(cap.gm, [FixFunctionalizationPass()])
    assert matches == {"fix_functionalization": 0}
    assert fh.has_auto_functionalized(fixed.graph)


def test_buffer_read_elsewhere_is_left_functional() -> None:
    """The fresh buffer has a second user (read before the op writes it): in place would change
    what that reader sees, so the node stays."""
    from torch import fx
    from torch._higher_order_ops.auto_functionalize import auto_functionalized

    g = fx.Graph()
    x, scale = g.placeholder("x"), g.placeholder("scale")
    buf = g.call_function(torch.ops.aten.empty.memory_format, ([4, 8],), {"dtype": FP8_DTYPE})
    other = g.call_function(torch.ops.aten.view.dtype, (buf, torch.uint8))
    at = g.call_function(auto_functionalized, (QUANT,),
                         {"result": buf, "input": x, "scale": scale})
    g.output((g.call_function(__import__("operator").getitem, (at, 1)), other))
    n = FixFunctionalizationPass().apply(g)
    assert n == 0 and fh.has_auto_functionalized(g)
