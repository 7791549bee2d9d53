"""Shared handles for the pattern files: op overloads and the fp8 buffer helper."""

from __future__ import annotations

import torch

import layerpass.ops  # noqa: F401  (registers the ops)
from layerpass.ops.quant import FP8_DTYPE

aten = torch.ops.aten
lp = torch.ops.layerpass
ATTN = lp.unified_attention_with_output.default
QUANT = lp.static_scaled_fp8_quant.default
RMS_NORM = lp.rms_norm.default
ADD_RMS_NORM = lp.fused_add_rms_norm.default
SILU_AND_MUL = lp.silu_and_mul.default
MOE = lp.moe_forward.default
MOE_SHARED = lp.moe_forward_shared.default


def empty_fp8(like: torch.Tensor, shape: list | tuple | torch.Size | None = None) -> torch.Tensor:
    """A fresh fp8 buffer: what the layers allocate before an out-variant quant."""
    return torch.empty(like.shape if shape is None else shape, dtype=FP8_DTYPE, device=like.device)
