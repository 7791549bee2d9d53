"""Attention + static FP8 output quant still fuses when the attention layers use sliding windows,
logit soft-capping and sinks (issue 15).

The features are layer attributes read by the op through its ``LayerName``, so the op's schema and
the traced chain are unchanged: a small model of decoder-like blocks whose attention layers each
use a different mix of features (and one none) is captured the way the backend sees it, and
``AttnQuantFusionPass`` must match every block's chain once. The fused graph's fp8 output equals
the unfused graph's bit for bit (the fused op quantises exactly the output it would have written),
the features really take effect (a feature-free run differs), and the dequantised output agrees
with the independent float64 reference.
"""

from __future__ import annotations

import operator

import pytest
import torch
from torch import fx, nn
from torch._higher_order_ops.auto_functionalize import auto_functionalized

from layerpass.layers import Attention  # first: registers the layerpass ops the fusion helpers look up
from tests.helpers import fusion as fh
from tests.helpers import reference as ref
from layerpass.layers.attention import CacheConfig
from layerpass.ops import FP8_DTYPE, LayerRegistry, build_batch_metadata, layer_registry_scope, set_forward_context
from layerpass.passes.cleanup import DeadCodeEliminationPass
from layerpass.passes.fix_functionalization import FixFunctionalizationPass

try:  # the fusion passes live next to their patterns
    from layerpass.patterns.attn_quant import AttnQuantFusionPass
except ImportError:  # pragma: no cover - older layout
    from layerpass.passes.fusion import AttnQuantFusionPass

ATTN = torch.ops.layerpass.unified_attention_with_output.default
QUANT = torch.ops.layerpass.static_scaled_fp8_quant.default
VIEWS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default, operator.getitem)
HEADS, KV_HEADS, HEAD = 4, 2, 16
BLOCK = 4
FEATURES = [
    {"sliding_window": 3, "logits_soft_cap": 2.0, "use_sinks": True},  # all of them
    {"sliding_window": 5},  # Mistral / Gemma local layer
    {},  # global layer
    {"logits_soft_cap": 1.5, "use_sinks": True},
]
SCALES = [256 ** -0.5, 0.015625 * 8, HEAD ** -0.5, 0.4]  # Gemma, Granite-like, plain, other


# graph inspection kept local: counts calls of an op, functionalized (``auto_functionalized(op, ...)``) or not
def calls(graph: fx.Graph, op) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function"
            and (n.target is op or (n.target is auto_functionalized and n.args[0] is op))]


def quants_fed_by_attention(graph: fx.Graph) -> list[fx.Node]:
    """The quant calls whose input comes, through views / getitems only, from an attention call."""
    found = []
    for n in calls(graph, QUANT):
        src = n.kwargs.get("input")
        while isinstance(src, fx.Node) and src.op == "call_function" and src.target in VIEWS:
            src = src.args[0]
        if isinstance(src, fx.Node) and src in calls(graph, ATTN):
            found.append(n)
    return found


def fp8_bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.uint8)


def quantise_out(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    torch.ops.layerpass.static_scaled_fp8_quant(q, x, scale)
    return q


class AttnQuantBlock(nn.Module):
    def __init__(self, i: int, dtype: torch.dtype, out_scale: float, **features) -> None:
        super().__init__()
        self.attn = Attention(HEADS, HEAD, SCALES[i], KV_HEADS, prefix=f"model.layers.{i}.self_attn.attn",
                              cache=CacheConfig(32, BLOCK), dtype=dtype, **features)
        self.scale = nn.Parameter(torch.tensor([out_scale]), requires_grad=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return quantise_out(self.attn(q, k, v), self.scale)


class Model(nn.Module):
    """Every block reads the same q/k/v (no linears: the graph is just the chains under test)."""

    def __init__(self, dtype: torch.dtype, out_scale: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(AttnQuantBlock(i, dtype, out_scale, **f) for i, f in enumerate(FEATURES))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        return [layer(q, k, v) for layer in self.layers]


def setup(dtype: torch.dtype, out_scale: float):
    registry = LayerRegistry("attn-quant-features")
    with layer_registry_scope(registry):
        model = Model(dtype, out_scale).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            if layer.attn.sinks is not None:
                layer.attn.sinks.copy_(torch.randn(HEADS, generator=g) * 2)
    # decode-first: two decodes over long histories, a prefill chunk over history, a fresh prefill
    query_lens, context_lens = [1, 1, 6, 3], [17, 9, 11, 0]
    hist = [(torch.randn(c, KV_HEADS, HEAD, generator=g).to(dtype), torch.randn(c, KV_HEADS, HEAD, generator=g).to(dtype))
            for c in context_lens]
    tables, nxt = [], 0
    for q, c in zip(query_lens, context_lens):
        n = -(-(q + c) // BLOCK)
        tables.append(list(range(nxt, nxt + n))[::-1])  # non-monotonic blocks
        nxt += n
    requests = [ref.Request(hk, hv, torch.randn(q, HEADS, HEAD, generator=g).to(dtype),
                            torch.randn(q, KV_HEADS, HEAD, generator=g).to(dtype),
                            torch.randn(q, KV_HEADS, HEAD, generator=g).to(dtype), bt)
                for (hk, hv), q, bt in zip(hist, query_lens, tables)]
    caches = []
    for layer in model.layers:
        layer.attn.kv_cache.normal_(generator=g)  # garbage outside the histories
        ref.fill_paged_cache(layer.attn.kv_cache, requests)
        caches.append(layer.attn.kv_cache.clone())
    md = build_batch_metadata(query_lens, context_lens, tables, BLOCK)
    cat = lambda n: torch.cat([getattr(r, n) for r in requests]).flatten(1)  # noqa: E731
    return model, registry, md, requests, caches, (cat("new_q"), cat("new_k"), cat("new_v"))


def reset(model: Model, caches: list[torch.Tensor]) -> None:
    for layer, c in zip(model.layers, caches):
        layer.attn.kv_cache.copy_(c)


@pytest.mark.parametrize("dtype,out_scale", [(torch.float32, 0.02), (torch.bfloat16, 0.05), (torch.float32, 0.002)])
def test_attn_quant_fuses_with_features(dtype: torch.dtype, out_scale: float) -> None:
    model, registry, md, requests, caches, inputs = setup(dtype, out_scale)
    n = len(FEATURES)
    with torch.no_grad(), set_forward_context(md, registry):
        eager = model(*inputs)
    reset(model, caches)
    cap = fh.capture_graph(model, list(inputs), metadata=md, registry=registry)
    attn_nodes = calls(cap.gm.graph, ATTN)
    assert len(attn_nodes) == n and len(calls(cap.gm.graph, QUANT)) == n
    assert len(quants_fed_by_attention(cap.gm.graph)) == n, "the captured graph lost the unfused chains: the test is broken"
    # no feature value is baked into the graph: the attention calls differ only in their layer-name input
    assert all(node.kwargs["output_scale"] is None for node in attn_nodes)
    assert len({node.kwargs["layer_name"] for node in attn_nodes}) == n
    assert all(node.kwargs["layer_name"].op == "placeholder" for node in attn_nodes)

    fused, matches = fh.apply_passes(cap.gm, [AttnQuantFusionPass()])
    assert matches == {"fuse_attn_quant": n}
    assert len(calls(fused.graph, ATTN)) == n and calls(fused.graph, QUANT) == []
    assert quants_fed_by_attention(fused.graph) == []
    for node in calls(fused.graph, ATTN):
        assert node.kwargs["output_scale"] is not None and node.kwargs["output"].meta["val"].dtype == FP8_DTYPE
    final = fh.apply_passes(fused, [DeadCodeEliminationPass(), FixFunctionalizationPass()])[0]
    assert not any(node.target is auto_functionalized for node in final.graph.nodes)
    assert len(calls(final.graph, ATTN)) == n and calls(final.graph, QUANT) == []

    with torch.no_grad(), set_forward_context(md, registry):
        reset(model, caches)
        unfused_out = cap.run()
        outs = {}
        for gm, what in ((fused, "fused graph"), (final, "fused + fix-functionalized graph")):
            reset(model, caches)
            outs[what] = cap.run(gm)
    for what, out in [("unfused graph", unfused_out), *outs.items()]:
        assert len(out) == n, what
        for i, (o, e) in enumerate(zip(out, eager)):
            assert o.dtype == FP8_DTYPE and o.shape == e.shape, what
            assert torch.equal(fp8_bits(o), fp8_bits(e)), f"{what}: layer {i} differs from eager"

    # the features took effect: the independent reference, quantised, is within one fp8 step (half:
    # the op rounds to the model dtype first), and a feature-free reference is not
    tol = ref.TOL[dtype]
    for i, (layer, e) in enumerate(zip(model.layers, eager)):
        a = layer.attn
        want = ref.attention_features(requests, a.scale, sliding_window=a.sliding_window, logits_soft_cap=a.logits_soft_cap,
                                      sinks=None if a.sinks is None else a.sinks.detach())
        got = e.float().double().view(want.shape) * out_scale
        torch.testing.assert_close(got, want.clamp(-448 * out_scale, 448 * out_scale),
                                   atol=tol["atol"] + 448 * out_scale / 8, rtol=0.07)
        if FEATURES[i]:
            plain = ref.attention(requests, a.scale)
            assert not torch.allclose(got, plain.clamp(-448 * out_scale, 448 * out_scale), atol=0.05), f"layer {i}"
