"""Static FP8 quant feeding an FP8 MoE -> ``moe_forward_quant_input`` (the op quantises itself).

Unfused: ``auto_functionalized(static_scaled_fp8_quant, result=buf, input=x, scale=s)`` ->
``moe_forward_fp8(q, s, logits, name, x.dtype)``. Fused: ``moe_forward_quant_input(x, s, logits, name)``.
The quant's scale must be the one the MoE op dequantises with (same graph node), so the
pattern uses one ``scale`` input for both. Closures as in ``attn_quant``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized

from .common import QUANT, empty_fp8, lp

MOE_FP8 = lp.moe_forward_fp8.default
MOE_QUANT_INPUT = lp.moe_forward_quant_input.default


def moe_quant_input_pattern(layer_name: str | None) -> tuple[Callable, Callable]:
    if layer_name is None:
        def pattern(x, scale, logits, layer_name):
            q = auto_functionalized(QUANT, result=empty_fp8(x), input=x, scale=scale)[1]
            return MOE_FP8(q, scale, logits, layer_name, x.dtype)

        def replacement(x, scale, logits, layer_name):
            return MOE_QUANT_INPUT(x, scale, logits, layer_name)

        return pattern, replacement

    def pattern_const(x, scale, logits):
        q = auto_functionalized(QUANT, result=empty_fp8(x), input=x, scale=scale)[1]
        return MOE_FP8(q, scale, logits, layer_name, x.dtype)

    def replacement_const(x, scale, logits):
        return MOE_QUANT_INPUT(x, scale, logits, layer_name)

    return pattern_const, replacement_const


def moe_quant_example_inputs(layer_name: object | None) -> list:
    return [torch.empty(5, 16), torch.empty(1), torch.empty(5, 4)] + ([layer_name] if layer_name is not None else [])
