"""LoRA wrappers of the parallel linear layers.

Column-parallel wrappers replicate ``A`` and shard ``B``'s output rows the way the base shards its
output (part by part, so a packed QKV adapter follows the ``[q_r | k_r | v_r]`` layout). The
row-parallel wrapper shards ``A``'s input columns and adds ``B (A_r x_r)`` to the rank's partial
sum BEFORE the all-reduce, so the sum over ranks is ``B A x``.

``can_replace_layer`` compares the source layer's type with ``maybe_get_oot_by_class(...)``, so an
out-of-tree replacement of the in-tree class is wrapped like the in-tree class itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .distributed import tensor_model_parallel_all_reduce
from .linear import ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from .lora_base import BaseLayerWithLoRA, LoRAConfig, LoRASlice
from .pluggable import maybe_get_oot_by_class


def _lora(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    return ((x.to(a.dtype) @ a.t()) @ b.t() * scaling).to(x.dtype)


class ColumnParallelLinearWithLoRA(BaseLayerWithLoRA):
    """One adapter over the whole (unpacked) output."""

    def _slice_parts(self) -> list[list[int]]:
        """Which base output parts each adapter slice covers (in order)."""
        return [list(range(len(self.base_layer.output_sizes)))]

    def _slice_names(self) -> list[str]:
        return ["out"]

    def slices(self, rank: int) -> list[LoRASlice]:
        sizes, k = self.base_layer.output_sizes, self.base_layer.input_size
        out = []
        for name, parts in zip(self._slice_names(), self._slice_parts()):
            part_sizes = [sizes[p] for p in parts]
            out.append(LoRASlice(name, (rank, k), (sum(part_sizes), rank), None, (0, part_sizes)))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        deltas = [_lora(x, *self.lora_pair(n), self.scaling) for n in self._slice_names()]
        return out + torch.cat(deltas, dim=-1)

    @classmethod
    def can_replace_layer(cls, source_layer: nn.Module, lora_config: LoRAConfig, packed_modules_list: list[str],
                          model_config: Any = None) -> bool:
        return type(source_layer) is maybe_get_oot_by_class(ColumnParallelLinear) and not source_layer.gather_output


class MergedColumnParallelLinearWithLoRA(ColumnParallelLinearWithLoRA):
    """One adapter per packed output (e.g. gate and up of ``gate_up_proj``)."""

    def _slice_parts(self) -> list[list[int]]:
        return [[i] for i in range(len(self.base_layer.output_sizes))]

    def _slice_names(self) -> list[str]:
        return [str(i) for i in range(len(self.base_layer.output_sizes))]

    @classmethod
    def can_replace_layer(cls, source_layer: nn.Module, lora_config: LoRAConfig, packed_modules_list: list[str],
                          model_config: Any = None) -> bool:
        return (type(source_layer) is maybe_get_oot_by_class(MergedColumnParallelLinear)
                and len(packed_modules_list) == len(source_layer.output_sizes) == 2)


class QKVParallelLinearWithLoRA(ColumnParallelLinearWithLoRA):
    """One adapter for the packed qkv output (checkpoint with a single ``qkv_proj``)."""

    @classmethod
    def can_replace_layer(cls, source_layer: nn.Module, lora_config: LoRAConfig, packed_modules_list: list[str],
                          model_config: Any = None) -> bool:
        return type(source_layer) is maybe_get_oot_by_class(QKVParallelLinear) and len(packed_modules_list) == 1


class MergedQKVParallelLinearWithLoRA(MergedColumnParallelLinearWithLoRA):
    """Three adapters: q, k and v (checkpoint with separate ``q_proj``/``k_proj``/``v_proj``)."""

    def _slice_names(self) -> list[str]:
        return ["q", "k", "v"]

    @classmethod
    def can_replace_layer(cls, source_layer: nn.Module, lora_config: LoRAConfig, packed_modules_list: list[str],
                          model_config: Any = None) -> bool:
        return type(source_layer) is maybe_get_oot_by_class(QKVParallelLinear) and len(packed_modules_list) == 3


class RowParallelLinearWithLoRA(BaseLayerWithLoRA):
    def slices(self, rank: int) -> list[LoRASlice]:
        k, n = self.base_layer.input_size, self.base_layer.output_size
        return [LoRASlice("out", (rank, k), (n, rank), (1, [k]), None)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base: RowParallelLinear = self.base_layer
        if not base.input_is_parallel and base.tp_size > 1:
            x = x.narrow(-1, base.tp_rank * base.input_size_per_partition, base.input_size_per_partition)
        out = base.partial_forward(x) + _lora(x, *self.lora_pair("out"), self.scaling)
        if base.reduce_results:
            out = tensor_model_parallel_all_reduce(out)
        if base.bias is not None and (base.reduce_results or base.tp_rank == 0):
            out = out + base.bias
        return out

    @classmethod
    def can_replace_layer(cls, source_layer: nn.Module, lora_config: LoRAConfig, packed_modules_list: list[str],
                          model_config: Any = None) -> bool:
        return type(source_layer) is maybe_get_oot_by_class(RowParallelLinear)
