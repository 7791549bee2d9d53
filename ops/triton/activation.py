"""Triton SiLU-and-mul, plain and fused with static FP8 quantisation.

``silu(x[..., :d]) * x[..., d:]`` in float32, rounded to the input dtype (the unfused op's
output), then optionally quantised. One program per (row, tile of ``d`` columns).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FP8_DTYPE, as_fp8_bytes, cast_rne, quantize_fp8_value, row_block, scale_as_f32


@triton.jit
def silu_f32(g):
    """``g * sigmoid(g)`` in float32, written as torch's CPU kernel does: ``g / (1 + exp(-g))``."""
    return tl.math.div_rn(g, 1.0 + tl.exp(-g))


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, scale_ptr, D, stride_x, stride_o,
    QUANT: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + D + offs, mask=mask, other=0.0).to(tl.float32)
    y = silu_f32(gate) * up
    if QUANT:  # round to the input dtype first, as the unfused silu_and_mul -> quant chain does
        y = quantize_fp8_value(cast_rne(y, x_ptr.dtype.element_ty).to(tl.float32), tl.load(scale_ptr))
        tl.store(out_ptr + row * stride_o + offs, y, mask=mask)  # fp8 bytes (out is a uint8 view)
    else:
        tl.store(out_ptr + row * stride_o + offs, cast_rne(y, out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_launch(
    x: torch.Tensor, scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Run the kernel on ``x [..., 2d]``; returns ``[..., d]`` (fp8 when ``scale`` is given).

    ``out_dtype`` (no scale) lets the MoE path keep its float32 intermediate unrounded."""
    two_d = x.shape[-1]
    d = two_d // 2
    x2 = x.reshape(-1, two_d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    dtype = FP8_DTYPE if scale is not None else (out_dtype or x.dtype)
    out = torch.empty((rows, d), dtype=dtype, device=x.device)
    if rows and d:
        block = row_block(d, cap=1024)
        _silu_and_mul_kernel[(rows, triton.cdiv(d, block))](
            x2, as_fp8_bytes(out), scale_as_f32(scale) if scale is not None else x2,
            d, x2.stride(0), out.stride(0),
            QUANT=scale is not None, BLOCK=block,
        )
    return out.view(*x.shape[:-1], d)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """CUDA kernel of ``layerpass::silu_and_mul``."""
    return silu_and_mul_launch(x)


def silu_and_mul_static_fp8_quant(input: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CUDA kernel of ``layerpass::silu_and_mul_static_fp8_quant``."""
    return silu_and_mul_launch(input, scale)
