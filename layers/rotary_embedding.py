"""Rotary position embedding (neox or GPT-J style) with a precomputed cos/sin cache, in plain torch."""

from __future__ import annotations

import torch

from layerpass.ops.step_inputs import PositionBounded

from .pluggable import PluggableLayer


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    if neox:
        x1, x2 = x.chunk(2, dim=-1)
    else:
        x1, x2 = x[..., ::2], x[..., 1::2]
    o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    return torch.cat((o1, o2), dim=-1) if neox else torch.stack((o1, o2), dim=-1).flatten(-2)


@PluggableLayer.register("rotary_embedding")
class RotaryEmbedding(PluggableLayer, PositionBounded):
    """``forward(positions [T], q [T, Hq*D], k [T, Hkv*D]) -> (q, k)`` rotated on the first ``rotary_dim``;
    positions must be below ``max_position``, the cos/sin cache length (``PositionBounded``)."""

    def __init__(self, head_size: int, rotary_dim: int | None = None, max_position: int = 4096, base: float = 10000.0,
                 is_neox_style: bool = True, prefix: str = "") -> None:
        super().__init__(prefix)
        rotary_dim = head_size if rotary_dim is None else rotary_dim
        if rotary_dim % 2 or not 0 < rotary_dim <= head_size:
            raise ValueError(f"RotaryEmbedding {prefix!r}: rotary_dim must be even and in (0, head_size={head_size}], got {rotary_dim}")
        self.head_size, self.rotary_dim, self.max_position = head_size, rotary_dim, max_position
        self.base, self.is_neox_style = base, is_neox_style
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        self.register_buffer("cos_sin_cache", torch.cat((freqs.cos(), freqs.sin()), dim=-1), persistent=False)

    def _rotate_heads(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        x3 = x.view(t, -1, self.head_size)
        rot = _rotate(x3[..., : self.rotary_dim].float(), cos, sin, self.is_neox_style).to(x.dtype)
        return torch.cat((rot, x3[..., self.rotary_dim :]), dim=-1).reshape(x.shape)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)  # [T, 1, rotary_dim / 2]
        return self._rotate_heads(query, cos, sin), self._rotate_heads(key, cos, sin)
