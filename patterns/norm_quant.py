"""RMSNorm (+ residual add) + static FP8 quant -> one fused op. ``eps`` is a pattern scalar."""

from __future__ import annotations

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized

from layerpass.passes.pattern_pass import PatternPass
from layerpass.patterns.common import ADD_RMS_NORM, QUANT, RMS_NORM, empty_fp8, lp


def rms_norm_quant_pattern(x, weight, scale, eps):
    normed = RMS_NORM(x, weight, eps)
    return auto_functionalized(QUANT, result=empty_fp8(normed), input=normed, scale=scale)[1]


def rms_norm_quant_replacement(x, weight, scale, eps):
    return lp.rms_norm_static_fp8_quant.default(x, weight, scale, eps)


def add_rms_norm_quant_pattern(x, residual, weight, scale, eps):
    normed, summed = ADD_RMS_NORM(x, residual, weight, eps)
    return auto_functionalized(QUANT, result=empty_fp8(normed), input=normed, scale=scale)[1], summed


def add_rms_norm_quant_replacement(x, residual, weight, scale, eps):
    out, summed = lp.fused_add_rms_norm_static_fp8_quant.default(x, residual, weight, scale, eps)
    return out, summed


def norm_example_inputs(with_residual: bool) -> list:
    """Fake-mode examples without ``eps`` (a scalar the matcher takes from ``SCALARS``)."""
    x = torch.empty(5, 16)
    return [x, torch.empty(5, 16)] + [torch.empty(16), torch.empty(1)] if with_residual else [x, torch.empty(16), torch.empty(1)]


SCALARS = {"eps": 1e-6}


class NormQuantFusionPass(PatternPass):
    name = "fuse_norm_quant"

    def register_patterns(self) -> None:
        self.register(rms_norm_quant_pattern, rms_norm_quant_replacement, lambda: norm_example_inputs(False),
                      scalar_workaround=SCALARS)
        self.register(add_rms_norm_quant_pattern, add_rms_norm_quant_replacement, lambda: norm_example_inputs(True),
                      scalar_workaround=SCALARS)
