"""RMSNorm (plain and fused residual-add) and SiLU-and-mul, as functional ops.

Kept as ops (not decomposed torch code) so the fusion passes find them as single nodes.
"""

from __future__ import annotations

import torch

from .library import layerpass_op


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + epsilon)
    return (out * weight.float()).to(x.dtype)


@layerpass_op("rms_norm", fake=lambda x, weight, epsilon: torch.empty_like(x))
def rms_norm(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    return rms_norm_ref(x, weight, epsilon)


def _add_fake(x, residual, weight, epsilon):
    return torch.empty_like(x), torch.empty_like(residual)


@layerpass_op("fused_add_rms_norm", fake=_add_fake)
def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(rms_norm(x + residual), x + residual)``."""
    summed = (x.float() + residual.float()).to(x.dtype)
    return rms_norm_ref(summed, weight, epsilon), summed


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    xf = x.float()
    return (torch.nn.functional.silu(xf[..., :d]) * xf[..., d:]).to(x.dtype)


def _silu_fake(x):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@layerpass_op("silu_and_mul", fake=_silu_fake)
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` with ``d = x.shape[-1] // 2``."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dimension, got {x.shape[-1]}")
    return silu_and_mul_ref(x)
