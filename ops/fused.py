"""Fused ops the fusion passes rewrite to (norm+quant, add+norm+quant, act+quant).

Each computes in float32 once and quantises the result, so it equals the unfused chain
``norm/act (model dtype) -> static_scaled_fp8_quant`` bit for bit.
"""

from __future__ import annotations

import torch

from .library import layerpass_op
from .norm import check_norm_args, check_silu_and_mul_arg, rms_norm_ref, silu_and_mul_ref
from .quant import FP8_DTYPE, _check_scale, quantize_fp8


@layerpass_op("rms_norm_static_fp8_quant", fake=lambda input, weight, scale, epsilon: torch.empty_like(input, dtype=FP8_DTYPE))
def rms_norm_static_fp8_quant(input: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``quantize(rms_norm(input))`` in one pass."""
    check_norm_args("rms_norm_static_fp8_quant", input, weight)
    _check_scale(scale)
    return quantize_fp8(rms_norm_ref(input, weight, epsilon), scale)


def _add_fake(input, residual, weight, scale, epsilon):
    return torch.empty_like(input, dtype=FP8_DTYPE), torch.empty_like(residual)


@layerpass_op("fused_add_rms_norm_static_fp8_quant", fake=_add_fake)
def fused_add_rms_norm_static_fp8_quant(
    input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(quantize(rms_norm(input + residual)), input + residual)``."""
    check_norm_args("fused_add_rms_norm_static_fp8_quant", input, weight, residual)
    _check_scale(scale)
    summed = (input.float() + residual.float()).to(input.dtype)
    return quantize_fp8(rms_norm_ref(summed, weight, epsilon), scale), summed


def _silu_fake(input, scale):
    return input.new_empty((*input.shape[:-1], input.shape[-1] // 2), dtype=FP8_DTYPE)


@layerpass_op("silu_and_mul_static_fp8_quant", fake=_silu_fake)
def silu_and_mul_static_fp8_quant(input: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``quantize(silu(input[..., :d]) * input[..., d:])``."""
    check_silu_and_mul_arg("silu_and_mul_static_fp8_quant", input)
    _check_scale(scale)
    return quantize_fp8(silu_and_mul_ref(input), scale)
