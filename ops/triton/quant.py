"""Triton static per-tensor FP8 quantisation: ``static_scaled_fp8_quant`` (out) and its functional form.

One program per ``BLOCK`` contiguous elements; the single scale is loaded once per program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FP8_DTYPE, as_fp8_bytes, quantize_fp8_value, scale_as_f32

BLOCK = 1024


@triton.jit
def _static_fp8_quant_kernel(x_ptr, out_ptr, scale_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, quantize_fp8_value(x, tl.load(scale_ptr)), mask=mask)  # fp8 bytes


def quantize_into(out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor) -> None:
    """``out`` (contiguous fp8) <- quantize(x / scale); ``x`` any layout of the same shape."""
    x = x.contiguous()
    n = x.numel()
    if n:
        _static_fp8_quant_kernel[(triton.cdiv(n, BLOCK),)](x, as_fp8_bytes(out), scale_as_f32(scale), n, BLOCK=BLOCK)


def static_scaled_fp8_quant(result: torch.Tensor, input: torch.Tensor, scale: torch.Tensor) -> None:
    """CUDA kernel of ``layerpass::static_scaled_fp8_quant``: same contract as the CPU op."""
    if result.is_contiguous():
        quantize_into(result, input, scale)
    else:  # the kernel writes a flat buffer; honour the caller's strides with one copy
        tmp = torch.empty(input.shape, dtype=FP8_DTYPE, device=input.device)
        quantize_into(tmp, input, scale)
        result.copy_(tmp)


def static_scaled_fp8_quant_functional(input: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CUDA kernel of ``layerpass::static_scaled_fp8_quant_functional``."""
    out = torch.empty(input.shape, dtype=FP8_DTYPE, device=input.device)
    quantize_into(out, input, scale)
    return out
