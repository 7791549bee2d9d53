"""Fused ops the fusion passes rewrite to (norm+quant, add+norm+quant, act+quant).

Each computes in float32 once and quantises the result, so it equals the unfused chain
``norm/act (model dtype) -> static_scaled_fp8_quant`` bit for bit.

The passes put these ops into graphs, so their fake kernels check the arguments (at trace time);
the entry points check in eager; the CPU kernels do not check (see ``ops/norm.py``'s docstring).
"""

from __future__ import annotations

import torch

from . import norm as _norm
from . import quant as _quant
from .library import layerpass_op
from .norm import add_residual, rms_norm_ref, silu_and_mul_ref
from .quant import FP8_DTYPE, quantize_fp8


def check_norm_quant_args(op: str, input: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                          residual: torch.Tensor | None = None) -> None:
    _norm.check_norm_args(op, input, weight, residual)
    _quant._check_scale(scale)


def check_act_quant_args(op: str, input: torch.Tensor, scale: torch.Tensor) -> None:
    _norm.check_silu_and_mul_arg(op, input)
    _quant._check_scale(scale)


def _check_rms_norm_quant(input: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, epsilon: float) -> None:
    check_norm_quant_args("rms_norm_static_fp8_quant", input, weight, scale)


@layerpass_op("rms_norm_static_fp8_quant", fake=lambda input, weight, scale, epsilon: torch.empty_like(input, dtype=FP8_DTYPE),
              check=_check_rms_norm_quant, lowers=True)
def _rms_norm_static_fp8_quant_kernel(input: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                                      epsilon: float) -> torch.Tensor:
    return quantize_fp8(rms_norm_ref(input, weight, epsilon), scale)


def rms_norm_static_fp8_quant(input: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                              epsilon: float) -> torch.Tensor:
    """``quantize(rms_norm(input))`` in one pass."""
    if not torch.compiler.is_compiling():
        _check_rms_norm_quant(input, weight, scale, epsilon)
    return torch.ops.layerpass.rms_norm_static_fp8_quant(input, weight, scale, epsilon)


def _check_add_rms_norm_quant(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                              epsilon: float) -> None:
    check_norm_quant_args("fused_add_rms_norm_static_fp8_quant", input, weight, scale, residual)


@layerpass_op("fused_add_rms_norm_static_fp8_quant",
              fake=lambda input, residual, weight, scale, epsilon: (torch.empty_like(input, dtype=FP8_DTYPE),
                                                                    torch.empty_like(residual)),
              check=_check_add_rms_norm_quant, lowers=True)
def _fused_add_rms_norm_static_fp8_quant_kernel(
    input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    summed = add_residual(input, residual)
    return quantize_fp8(rms_norm_ref(summed, weight, epsilon), scale), summed


def fused_add_rms_norm_static_fp8_quant(
    input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(quantize(rms_norm(input + residual)), input + residual)``."""
    if not torch.compiler.is_compiling():
        _check_add_rms_norm_quant(input, residual, weight, scale, epsilon)
    return torch.ops.layerpass.fused_add_rms_norm_static_fp8_quant(input, residual, weight, scale, epsilon)


def _check_silu_quant(input: torch.Tensor, scale: torch.Tensor) -> None:
    check_act_quant_args("silu_and_mul_static_fp8_quant", input, scale)


@layerpass_op("silu_and_mul_static_fp8_quant",
              fake=lambda input, scale: input.new_empty((*input.shape[:-1], input.shape[-1] // 2), dtype=FP8_DTYPE),
              check=_check_silu_quant, lowers=True)
def _silu_and_mul_static_fp8_quant_kernel(input: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return quantize_fp8(silu_and_mul_ref(input), scale)


def silu_and_mul_static_fp8_quant(input: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``quantize(silu(input[..., :d]) * input[..., d:])``."""
    if not torch.compiler.is_compiling():
        _check_silu_quant(input, scale)
    return torch.ops.layerpass.silu_and_mul_static_fp8_quant(input, scale)
