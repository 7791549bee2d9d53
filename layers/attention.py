"""``Attention``: paged causal GQA attention over the ``unified_attention_with_output`` op.

Per-layer features (``scale``, ``sliding_window``, ``logits_soft_cap``, ``sinks``) are plain
attributes the op reads through the layer's name, so they never enter the traced graph.

The layer owns its KV cache as a PLAIN attribute (not a buffer or parameter): only the op,
which resolves the layer by name, reads and writes it; the traced forward never touches it.
Forward is exactly "op, then view", the shape the attention+quant fusion pass rewrites.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from layerpass.ops import encode_layer_name
from layerpass.ops.attention import (
    check_logits_soft_cap,
    check_scale,
    check_sliding_window,
    unified_attention_with_output,
)

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
                 cache: CacheConfig | None = None, dtype: torch.dtype | None = None, *,
                 sliding_window: int | None = None, logits_soft_cap: float | None = None,
                 use_sinks: bool = False) -> None:
        # checked before the layer registers itself under its prefix
        scale = check_scale(scale, prefix)
        sliding_window = check_sliding_window(sliding_window, prefix)
        logits_soft_cap = check_logits_soft_cap(logits_soft_cap, prefix)
        if not isinstance(use_sinks, bool):
            raise ValueError(f"attention layer {prefix!r}: use_sinks must be a bool, got {use_sinks!r}")
        super().__init__(prefix)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads <= 0 or head_size <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"Attention {prefix!r}: need positive sizes and num_heads a multiple of num_kv_heads, "
                             f"got num_heads={num_heads}, num_kv_heads={num_kv_heads}, head_size={head_size}")
        self.num_heads, self.num_kv_heads, self.head_size, self.scale = num_heads, num_kv_heads, head_size, scale
        # Per-layer features, read by the op through the layer's LayerName (never graph constants):
        # layers differing only in these values trace to the same graph and share a compiled piece.
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap
        # GPT-OSS-style learned sinks: one logit per (per-rank) query head, in the softmax denominator only.
        self.sinks = nn.Parameter(torch.zeros(num_heads), requires_grad=False) if use_sinks else None
        self.cache_config = cache if cache is not None else CacheConfig()
        self.kv_cache = torch.zeros(2, self.cache_config.num_blocks, self.cache_config.block_size, num_kv_heads, head_size,
                                    dtype=dtype or torch.get_default_dtype())

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t = q.shape[0]
        q3 = q.view(t, self.num_heads, self.head_size)
        k3 = k.view(t, self.num_kv_heads, self.head_size)
        v3 = v.view(t, self.num_kv_heads, self.head_size)
        output = torch.empty_like(q3)
        unified_attention_with_output(q3, k3, v3, output, encode_layer_name(self.prefix))
        return output.view(t, self.num_heads * self.head_size)

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in (("sliding_window", self.sliding_window),
                                                   ("logits_soft_cap", self.logits_soft_cap)) if v is not None)
        extra += ", sinks" if self.sinks is not None else ""
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_size={self.head_size}, scale={self.scale:g}"
                f"{extra}, cache={tuple(self.kv_cache.shape)}")
