"""SiLU-and-mul + static FP8 quant -> one fused op."""

from __future__ import annotations

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized

from layerpass.passes.pattern_pass import PatternPass
from layerpass.patterns.common import QUANT, SILU_AND_MUL, empty_fp8, lp


def silu_mul_quant_pattern(x, scale):
    act = SILU_AND_MUL(x)
    return auto_functionalized(QUANT, result=empty_fp8(act), input=act, scale=scale)[1]


def silu_mul_quant_replacement(x, scale):
    return lp.silu_and_mul_static_fp8_quant.default(x, scale)


def act_example_inputs() -> list:
    return [torch.empty(5, 32), torch.empty(1)]


class ActQuantFusionPass(PatternPass):
    name = "fuse_act_quant"

    def register_patterns(self) -> None:
        self.register(silu_mul_quant_pattern, silu_mul_quant_replacement, act_example_inputs)
