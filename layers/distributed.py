"""Tensor-parallel helpers over ``torch.distributed`` (gloo on CPU, NCCL on GPU).

The whole default process group is the tensor-parallel group. When ``torch.distributed`` is
not initialised the world size is 1, the rank 0, and the layers skip communication entirely
(a Python-level branch, so single-process graphs hold no collective).

The collectives are ``layerpass`` custom ops (functional: they return a new tensor), so
``torch.compile`` traces them as single opaque nodes instead of graph-breaking on the
in-place ``torch.distributed`` calls.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from layerpass.ops import layerpass_op


def get_tp_world_size() -> int:
    """Number of tensor-parallel ranks (1 without an initialised process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_tp_rank() -> int:
    """This process's tensor-parallel rank (0 without an initialised process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    """Exact division; raises naming ``what`` when the split is uneven."""
    if numerator % denominator:
        raise ValueError(f"{what} {numerator} is not divisible by the tensor-parallel world size {denominator}")
    return numerator // denominator


@layerpass_op("tp_all_reduce", fake=lambda x: torch.empty_like(x))
def _all_reduce_op(x: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    if get_tp_world_size() > 1:
        dist.all_reduce(out)
    return out


def _gather_fake(x: torch.Tensor, dim: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] *= get_tp_world_size()
    return x.new_empty(shape)


@layerpass_op("tp_all_gather", fake=_gather_fake)
def _all_gather_op(x: torch.Tensor, dim: int) -> torch.Tensor:
    world = get_tp_world_size()
    if world == 1:
        return x.clone()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the tensor-parallel ranks (identity at world size 1)."""
    if get_tp_world_size() == 1:
        return x
    return torch.ops.layerpass.tp_all_reduce(x)


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in rank order (identity at world size 1)."""
    if get_tp_world_size() == 1:
        return x
    return torch.ops.layerpass.tp_all_gather(x, dim % x.dim())
