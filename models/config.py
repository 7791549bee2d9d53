"""``ModelConfig``: the widths of a zoo model (small defaults: 80 layers run on 2 CPU cores)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from layerpass.layers import CacheConfig, Fp8Config


def is_positive_int(value: object) -> bool:
    """An int > 0, not a bool (``True`` is an int to Python, not a layer count)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class ModelConfig:
    """Every field can be overridden through ``build_model(name, **overrides)``.

    A model with more knobs registers a subclass (``register_model(name, config_cls=...)``)."""

    num_layers: int = 2
    vocab_size: int = 256
    hidden_size: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    head_size: int = 16
    intermediate_size: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position: int = 4096
    qkv_bias: bool = False
    dtype: torch.dtype = torch.float32
    # KV cache and recurrent-state geometry (see make_step)
    num_blocks: int = 128
    block_size: int = 16
    num_state_slots: int = 32
    # MoE (Qwen2-MoE-like)
    num_experts: int = 8
    top_k: int = 2
    moe_intermediate_size: int = 32
    shared_expert_intermediate_size: int = 64
    norm_topk_prob: bool = False
    # Static FP8 (``None``: unquantised)
    quant_config: Fp8Config | None = None

    def __post_init__(self) -> None:
        ints = ("num_layers", "vocab_size", "hidden_size", "num_heads", "num_kv_heads", "head_size", "intermediate_size",
                "max_position", "num_blocks", "block_size", "num_state_slots", "num_experts", "top_k",
                "moe_intermediate_size", "shared_expert_intermediate_size")
        bad = [f"{n}={getattr(self, n)!r}" for n in ints if not is_positive_int(getattr(self, n))]
        if bad:
            raise ValueError(f"ModelConfig fields must be positive ints: {', '.join(bad)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype (float32, float16, bfloat16), got {self.dtype!r}")

    @property
    def cache_config(self) -> CacheConfig:
        return CacheConfig(num_blocks=self.num_blocks, block_size=self.block_size)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]
