"""RMSNorm (plain and fused residual-add) and SiLU-and-mul, as functional ops.

Kept as ops (not decomposed torch code) so the fusion passes find them as single nodes.

Where argument checks run (every op module of ``layerpass.ops`` does the same): the layer-facing
entry points (``rms_norm``, ``fused_add_rms_norm``, ``silu_and_mul`` here) check, then call
``torch.ops.layerpass.<op>``; in eager that is every call, and under ``torch.compile`` Dynamo
traces through them to the same single op node, skipping the check (``is_compiling``). The op's
fake (meta) kernel runs the same check (``layerpass_op(..., check=)``: one function per op) on
fake tensors: at trace time, once per compiled piece, and for ops that only passes put into a
graph; the lowering pass asks it too, on the graph's symbolic sizes. The real kernels (CPU here, Triton on CUDA) do not
check: a compiled step pays for no check. Call the entry points, not the raw op: the raw op in
eager runs unchecked.
"""

from __future__ import annotations

import torch

from .library import layerpass_op, sizes_differ


def check_norm_args(op: str, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> None:
    """Clear errors for what would otherwise fail deep in broadcasting (or silently cast)."""
    if not x.is_floating_point() or x.dtype == torch.float8_e4m3fn:
        raise ValueError(f"{op}: input must be fp16/bf16/fp32, got {x.dtype}")
    if x.dim() < 1 or sizes_differ(weight.shape, (x.shape[-1],)):
        raise ValueError(f"{op}: weight must have shape ({x.shape[-1] if x.dim() else '?'},) (the input's last dim), got {tuple(weight.shape)}")
    if residual is not None and (sizes_differ(residual.shape, x.shape) or residual.dtype != x.dtype):
        raise ValueError(
            f"{op}: residual must match the input's shape {tuple(x.shape)} and dtype {x.dtype}, "
            f"got {tuple(residual.shape)} {residual.dtype}"
        )


def check_silu_and_mul_arg(op: str, x: torch.Tensor) -> None:
    if x.dim() < 1 or sizes_differ(x.shape[-1] % 2, 0):
        raise ValueError(f"{op} needs an even last dimension (gate and up halves), got shape {tuple(x.shape)}")


def check_rms_norm(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> None:
    check_norm_args("rms_norm", x, weight)


def check_fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float) -> None:
    check_norm_args("fused_add_rms_norm", x, weight, residual)


def check_silu_and_mul(x: torch.Tensor) -> None:
    check_silu_and_mul_arg("silu_and_mul", x)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + epsilon)
    return (out * weight.float()).to(x.dtype)


def add_residual(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``x + residual`` summed in float32, in the model dtype: the residual stream the fused ops return."""
    return (x.float() + residual.float()).to(x.dtype)


@layerpass_op("rms_norm", fake=lambda x, weight, epsilon: torch.empty_like(x), check=check_rms_norm, lowers=True)
def _rms_norm_kernel(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    return rms_norm_ref(x, weight, epsilon)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``torch.ops.layerpass.rms_norm`` after its argument checks (see the module docstring)."""
    if not torch.compiler.is_compiling():
        check_rms_norm(x, weight, epsilon)
    return torch.ops.layerpass.rms_norm(x, weight, epsilon)


@layerpass_op("fused_add_rms_norm", fake=lambda x, residual, weight, epsilon: (torch.empty_like(x), torch.empty_like(residual)),
              check=check_fused_add_rms_norm, lowers=True)
def _fused_add_rms_norm_kernel(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    summed = add_residual(x, residual)
    return rms_norm_ref(summed, weight, epsilon), summed


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)``: ``torch.ops.layerpass.fused_add_rms_norm`` after
    its argument checks."""
    if not torch.compiler.is_compiling():
        check_fused_add_rms_norm(x, residual, weight, epsilon)
    return torch.ops.layerpass.fused_add_rms_norm(x, residual, weight, epsilon)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    xf = x.float()
    return (torch.nn.functional.silu(xf[..., :d]) * xf[..., d:]).to(x.dtype)


@layerpass_op("silu_and_mul", fake=lambda x: x.new_empty((*x.shape[:-1], x.shape[-1] // 2)),
              check=check_silu_and_mul, lowers=True)
def _silu_and_mul_kernel(x: torch.Tensor) -> torch.Tensor:
    return silu_and_mul_ref(x)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` with ``d = x.shape[-1] // 2``: ``torch.ops.layerpass.silu_and_mul``
    after its argument check."""
    if not torch.compiler.is_compiling():
        check_silu_and_mul(x)
    return torch.ops.layerpass.silu_and_mul(x)
