"""Triton RMSNorm, fused residual-add RMSNorm, and their static-FP8-quant fusions.

One kernel serves all four ops: one program per row; pass 1 (optionally adding the
residual and storing the sum) accumulates the sum of squares, pass 2 normalises, applies
the weight, rounds to the model dtype (as the unfused op would) and optionally quantises.
Rows longer than the tile are looped over, so any hidden size works.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FP8_DTYPE, as_fp8_bytes, cast_rne, quantize_fp8_value, reduce_sum, row_block, scale_as_f32


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, scale_ptr,
    H, eps,
    stride_x, stride_r, stride_o, stride_s,
    HAS_RESIDUAL: tl.constexpr, QUANT: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    sq = tl.full([BLOCK], 0.0, dtype=tl.float32)
    for start in range(0, H, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < H
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
            summed = cast_rne(x + r, sum_ptr.dtype.element_ty)  # the residual stream keeps the model dtype
            tl.store(sum_ptr + row * stride_s + offs, summed, mask=mask)
            x = summed.to(tl.float32)
        sq += x * x
    # torch.rsqrt(mean + eps), with correctly rounded sqrt and division (rsqrt.approx is not)
    rstd = tl.math.div_rn(1.0, tl.sqrt_rn(reduce_sum(sq, 0) / H + eps))
    if QUANT:
        scale = tl.load(scale_ptr)
    for start in range(0, H, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < H
        if HAS_RESIDUAL:  # re-read the sum this program just wrote (same offsets, same thread)
            x = tl.load(sum_ptr + row * stride_s + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = cast_rne((x * rstd) * w, x_ptr.dtype.element_ty)  # the unfused norm's output dtype
        if QUANT:
            y = quantize_fp8_value(y.to(tl.float32), scale)  # fp8 bytes (out is a uint8 view)
        tl.store(out_ptr + row * stride_o + offs, y, mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, H]`` with a unit inner stride (copies only if it must)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm_launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    epsilon: float,
    residual: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the kernel; returns ``(normed or fp8, summed or None)`` shaped like ``x``.

    ``block`` overrides the row tile (a power of two); rows longer than it are looped over."""
    h = x.shape[-1]
    x2 = _rows(x)
    rows = x2.shape[0]
    out = torch.empty((rows, h), dtype=FP8_DTYPE if scale is not None else x.dtype, device=x.device)
    summed = torch.empty((rows, h), dtype=x.dtype, device=x.device) if residual is not None else None
    r2 = _rows(residual) if residual is not None else x2
    s2 = summed if summed is not None else out
    scale_arg = scale_as_f32(scale) if scale is not None else weight  # unread when QUANT is off
    if rows and h:
        _rms_norm_kernel[(rows,)](
            x2, r2, weight.contiguous(), as_fp8_bytes(out), s2, scale_arg,
            h, float(epsilon),
            x2.stride(0), r2.stride(0), out.stride(0), s2.stride(0),
            HAS_RESIDUAL=residual is not None, QUANT=scale is not None, BLOCK=block or row_block(h),
        )
    return out.view(x.shape), (summed.view(x.shape) if summed is not None else None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    """CUDA kernel of ``layerpass::rms_norm``."""
    return rms_norm_launch(x, weight, epsilon)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA kernel of ``layerpass::fused_add_rms_norm``: ``(rms_norm(x + residual), x + residual)``."""
    out, summed = rms_norm_launch(x, weight, epsilon, residual=residual)
    return out, summed


def rms_norm_static_fp8_quant(input: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, epsilon: float) -> torch.Tensor:
    """CUDA kernel of ``layerpass::rms_norm_static_fp8_quant``."""
    return rms_norm_launch(input, weight, epsilon, scale=scale)[0]


def fused_add_rms_norm_static_fp8_quant(
    input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA kernel of ``layerpass::fused_add_rms_norm_static_fp8_quant``."""
    out, summed = rms_norm_launch(input, weight, epsilon, residual=residual, scale=scale)
    return out, summed
