"""Static FP8 quant feeding an FP8 MoE -> ``moe_forward_quant_input`` (the op quantises itself).

Unfused: ``auto_functionalized(static_scaled_fp8_quant, result=buf, input=x, scale=s)`` ->
``moe_forward_fp8(q, s, logits, name, x.dtype)``. Fused: ``moe_forward_quant_input(x, s, logits, name)``:
the fp8 copy of the activations never goes through memory. The quant's scale must be the one
the MoE op dequantises with (same graph node), so the body uses one ``scale`` input for both.
"""

from __future__ import annotations

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized

from layerpass.passes.pattern_pass import PatternPass
from layerpass.patterns.common import QUANT, empty_fp8, lp

MOE_FP8 = lp.moe_forward_fp8.default
MOE_QUANT_INPUT = lp.moe_forward_quant_input.default


def moe_quant_input_pattern(x, scale, logits, layer_name):
    q = auto_functionalized(QUANT, result=empty_fp8(x), input=x, scale=scale)[1]
    return MOE_FP8(q, scale, logits, layer_name, x.dtype)


def moe_quant_input_replacement(x, scale, logits, layer_name):
    return MOE_QUANT_INPUT(x, scale, logits, layer_name)


def moe_quant_input_example_inputs() -> list:
    return [torch.empty(5, 16), torch.empty(1), torch.empty(5, 4)]


class MoEQuantInputFusionPass(PatternPass):
    name = "fuse_moe_quant_input"
    named_op = lp.moe_forward_fp8

    def register_layer_patterns(self, layer_name: str | None) -> None:
        self.register(moe_quant_input_pattern, moe_quant_input_replacement, moe_quant_input_example_inputs,
                      layer_name=layer_name)
