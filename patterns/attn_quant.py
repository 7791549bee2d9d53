"""Attention + static FP8 output quant -> attention writing FP8 (``output_scale=scale``).

Unfused: ``auto_functionalized(attention, output=buf, output_scale=None)`` -> reshape ->
``static_scaled_fp8_quant``. Fused: one attention call whose output buffer is fp8.

One body names the layer through its ``layer_name`` parameter: with LayerName it is a
pattern input (one registration matches every layer), without it ``PatternPass`` binds each
layer's ``str`` into the same body.
"""

from __future__ import annotations

import torch
from torch import fx
from torch._higher_order_ops.auto_functionalize import auto_functionalized
from torch._prims_common import is_contiguous_or_false

from layerpass.passes.pattern_pass import PatternPass
from layerpass.patterns.common import ATTN, QUANT, aten, empty_fp8, lp


def attn_quant_pattern(q, k, v, output, scale, layer_name):
    at = auto_functionalized(ATTN, query=q, key=k, value=v, output=output, layer_name=layer_name, output_scale=None)
    flat = aten.reshape.default(at[1], [q.shape[0], q.shape[1] * q.shape[2]])
    return auto_functionalized(QUANT, result=empty_fp8(flat), input=flat, scale=scale)[1]


def attn_quant_replacement(q, k, v, output, scale, layer_name):
    at = auto_functionalized(ATTN, query=q, key=k, value=v, output=empty_fp8(output), layer_name=layer_name,
                             output_scale=scale)
    return aten.reshape.default(at[1], [q.shape[0], q.shape[1] * q.shape[2]])


def attn_quant_example_inputs() -> list:
    """Small fake-mode examples (shapes are wildcards in the registered pattern); no layer name."""
    q = torch.empty(5, 4, 16)
    kv = torch.empty(5, 2, 16)
    return [q, kv, kv.clone(), torch.empty(5, 4, 16), torch.empty(1)]


def reshapes_to_views(graph: fx.Graph) -> int:
    """``reshape`` of a contiguous tensor is a ``view``; the pattern is traced with views
    (tracing decomposes reshape), while Dynamo graphs may keep ``reshape``."""
    changed = 0
    for node in graph.nodes:
        if node.op == "call_function" and node.target is aten.reshape.default:
            val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
            if isinstance(val, torch.Tensor) and is_contiguous_or_false(val):  # no guard on unbacked sizes
                node.target = aten.view.default
                changed += 1
    return changed


class AttnQuantFusionPass(PatternPass):
    name = "fuse_attn_quant"
    named_op = lp.unified_attention_with_output

    def register_layer_patterns(self, layer_name: str | None) -> None:
        self.register(attn_quant_pattern, attn_quant_replacement, attn_quant_example_inputs, layer_name=layer_name)

    def apply(self, graph: fx.Graph) -> int:
        reshapes_to_views(graph)
        return super().apply(graph)
