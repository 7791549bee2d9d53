"""RMSNorm (plain and fused residual-add) and SiLU-and-mul, as functional ops.

Kept as ops (not decomposed torch code) so the fusion passes find them as single nodes.
"""

from __future__ import annotations

import torch

from .library import layerpass_op


def check_norm_args(op: str, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> None:
    """Clear errors for what would otherwise fail deep in broadcasting (or silently cast)."""
    if not x.is_floating_point() or x.dtype == torch.float8_e4m3fn:
        raise ValueError(f"{op}: input must be fp16/bf16/fp32, got {x.dtype}")
    if x.dim() < 1 or weight.shape != (x.shape[-1],):
        raise ValueError(f"{op}: weight must have shape ({x.shape[-1] if x.dim() else '?'},) (the input's last dim), got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"{op}: residual must match the input's shape {tuple(x.shape)} and dtype {x.dtype}, "
            f"got {tuple(residual.shape)} {residual.dtype}"
        )


def check_silu_and_mul_arg(op: str, x: torch.Tensor) -> None:
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"{op} needs an even last dimension (gate and up halves), got shape {tuple(x.shape)}")


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + epsilon)
    return (out * weight.float()).to(x.dtype)


@layerpass_op("rms_norm", fake=lambda x, weight, epsilon: torch.empty_like(x))
def rms_norm(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    check_norm_args("rms_norm", x, weight)
    return rms_norm_ref(x, weight, epsilon)


def _add_fake(x, residual, weight, epsilon):
    return torch.empty_like(x), torch.empty_like(residual)


@layerpass_op("fused_add_rms_norm", fake=_add_fake)
def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(rms_norm(x + residual), x + residual)``."""
    check_norm_args("fused_add_rms_norm", x, weight, residual)
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
    check_silu_and_mul_arg("silu_and_mul", x)
    return silu_and_mul_ref(x)
