"""``Attention``: paged causal GQA attention over the ``unified_attention_with_output`` op.

The layer owns its KV cache as a PLAIN attribute (not a buffer or parameter): only the op,
which resolves the layer by name, reads and writes it; the traced forward never touches it.
Forward is exactly "op, then view", the shape the attention+quant fusion pass rewrites.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layerpass.ops import encode_layer_name

from .pluggable import PluggableLayer


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache geometry shared by every attention layer of a model."""

    num_blocks: int = 64
    block_size: int = 16

    def __post_init__(self) -> None:
        if self.num_blocks <= 0 or self.block_size <= 0:
            raise ValueError(f"CacheConfig needs num_blocks > 0 and block_size > 0, got {self.num_blocks}, {self.block_size}")

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size


@PluggableLayer.register("attention")
class Attention(PluggableLayer):
    """``forward(q [T, Hq*D], k [T, Hkv*D], v [T, Hkv*D]) -> [T, Hq*D]``; head counts are per rank."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None, prefix: str = "",
                 cache: CacheConfig | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(prefix)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads <= 0 or head_size <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"Attention {prefix!r}: need positive sizes and num_heads a multiple of num_kv_heads, "
                             f"got num_heads={num_heads}, num_kv_heads={num_kv_heads}, head_size={head_size}")
        self.num_heads, self.num_kv_heads, self.head_size, self.scale = num_heads, num_kv_heads, head_size, float(scale)
        self.cache_config = cache if cache is not None else CacheConfig()
        self.kv_cache = torch.zeros(2, self.cache_config.num_blocks, self.cache_config.block_size, num_kv_heads, head_size,
                                    dtype=dtype or torch.get_default_dtype())

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t = q.shape[0]
        q3 = q.view(t, self.num_heads, self.head_size)
        k3 = k.view(t, self.num_kv_heads, self.head_size)
        v3 = v.view(t, self.num_kv_heads, self.head_size)
        output = torch.empty_like(q3)
        torch.ops.layerpass.unified_attention_with_output(q3, k3, v3, output, encode_layer_name(self.prefix))
        return output.view(t, self.num_heads * self.head_size)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_size={self.head_size}, cache={tuple(self.kv_cache.shape)}"
