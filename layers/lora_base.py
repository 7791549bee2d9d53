"""LoRA building blocks: ``LoRAConfig`` and ``BaseLayerWithLoRA`` (adapter storage and sharding).

A wrapper holds one adapter pair ``(A [r, in], B [out, r])`` per packed slice of its base layer
(``lora_a_<slice>`` / ``lora_b_<slice>`` buffers, this rank's shard). ``set_lora`` takes the
FULL (unsharded) tensors and keeps the rank's part, so 1 and N ranks can load the same adapter.
The contribution is ``scaling * B (A x)`` with ``scaling = lora_alpha / max_lora_rank``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .distributed import get_tp_rank, get_tp_world_size
from .weights import shard


@dataclass(frozen=True)
class LoRAConfig:
    max_lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dtype: torch.dtype | None = None  # default: the base layer's activation dtype
    target_modules: tuple[str, ...] | None = None  # last-name filter (None: every replaceable layer)

    def __post_init__(self) -> None:
        if not (isinstance(self.max_lora_rank, int) and self.max_lora_rank > 0):
            raise ValueError(f"LoRAConfig.max_lora_rank must be a positive int, got {self.max_lora_rank!r}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.max_lora_rank


@dataclass(frozen=True)
class LoRASlice:
    """One adapter pair. ``*_shard``: ``(dim, part_sizes)``: the dim is cut into parts, each part
    is split evenly over the ranks and the rank's pieces concatenated; ``None``: replicated."""

    name: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    a_shard: tuple[int, list[int]] | None = None
    b_shard: tuple[int, list[int]] | None = None


def shard_parts(full: torch.Tensor, spec: tuple[int, list[int]] | None, rank: int, world: int) -> torch.Tensor:
    if spec is None or world == 1:
        return full.contiguous()
    dim, parts = spec
    return torch.cat([shard(p, dim, rank, world) for p in full.split(parts, dim=dim)], dim=dim)


class BaseLayerWithLoRA(nn.Module):
    """Wraps ``base_layer``; subclasses define ``slices()``, ``forward`` and ``can_replace_layer``."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.prefix = getattr(base_layer, "prefix", "")
        self.tp_size, self.tp_rank = get_tp_world_size(), get_tp_rank()
        self.scaling = 0.0
        self.lora_config: LoRAConfig | None = None

    def slices(self, rank: int) -> list[LoRASlice]:
        raise NotImplementedError

    def _act_dtype(self) -> torch.dtype:
        for p in self.base_layer.parameters():
            if p.dtype.is_floating_point and p.element_size() > 1:
                return p.dtype
        return torch.get_default_dtype()

    def create_lora_weights(self, lora_config: LoRAConfig) -> None:
        """Allocate zero adapters (a zero B: the wrapped layer computes exactly the base output)."""
        self.lora_config = lora_config
        self.scaling = lora_config.scaling
        dtype = lora_config.lora_dtype or self._act_dtype()
        for s in self.slices(lora_config.max_lora_rank):
            a = shard_parts(torch.zeros(s.a_shape), s.a_shard, self.tp_rank, self.tp_size)
            b = shard_parts(torch.zeros(s.b_shape), s.b_shard, self.tp_rank, self.tp_size)
            self.register_buffer(f"lora_a_{s.name}", a.to(dtype))
            self.register_buffer(f"lora_b_{s.name}", b.to(dtype))

    def set_lora(self, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Load FULL adapters ``{slice: (A, B)}``; every slice must be given."""
        if self.lora_config is None:
            raise RuntimeError(f"{type(self).__name__} {self.prefix!r}: call create_lora_weights first")
        expected = {s.name: s for s in self.slices(self.lora_config.max_lora_rank)}
        if set(weights) != set(expected):
            raise ValueError(f"{type(self).__name__} {self.prefix!r}: adapters for slices {sorted(expected)} needed, "
                             f"got {sorted(weights)}")
        for name, (a, b) in weights.items():
            s = expected[name]
            if tuple(a.shape) != s.a_shape or tuple(b.shape) != s.b_shape:
                raise ValueError(f"{type(self).__name__} {self.prefix!r} slice {name!r}: A must be {s.a_shape} and B "
                                 f"{s.b_shape}, got {tuple(a.shape)} and {tuple(b.shape)}")
            dst_a, dst_b = getattr(self, f"lora_a_{name}"), getattr(self, f"lora_b_{name}")
            dst_a.copy_(shard_parts(a, s.a_shard, self.tp_rank, self.tp_size))
            dst_b.copy_(shard_parts(b, s.b_shard, self.tp_rank, self.tp_size))

    def reset_lora(self) -> None:
        for name, buf in self.named_buffers(recurse=False):
            if name.startswith("lora_"):
                buf.zero_()

    def random_lora(self, seed: int, std: float = 0.1) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Full random adapters of the right shapes (for tests and demos); not loaded."""
        if self.lora_config is None:
            raise RuntimeError(f"{type(self).__name__} {self.prefix!r}: call create_lora_weights first")
        g = torch.Generator().manual_seed(seed)
        return {s.name: (torch.randn(s.a_shape, generator=g) * std, torch.randn(s.b_shape, generator=g) * std)
                for s in self.slices(self.lora_config.max_lora_rank)}

    def lora_pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"lora_a_{name}"), getattr(self, f"lora_b_{name}")

    @classmethod
    def can_replace_layer(cls, source_layer: nn.Module, lora_config: LoRAConfig, packed_modules_list: list[str],
                          model_config: Any = None) -> bool:
        raise NotImplementedError
