"""Dense MLPs of converted Hugging Face models.

- ``TransformersMLP``: ``down_proj(silu_and_mul(gate_up_proj(x)))``, one ``MergedColumnParallelLinear``
  then the ``silu_and_mul`` layer (the shape the act+quant and MoE fusions match). It replaces an
  HF MLP whose forward a probe shows to be a SiLU-gated MLP (``convert.py``).
- ``TransformersPackedMLP``: any other gated MLP with separate ``gate_proj``/``up_proj`` (Gemma's
  GELU): one packed ``gate_up_proj``, and the HF module, run by its own forward, sees
  ``PackedSlice`` views of its output as its ``gate_proj``/``up_proj``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from layerpass.layers import MergedColumnParallelLinear, RowParallelLinear, SiluAndMul

from .attention import ReadsThrough


class TransformersMLP(nn.Module):
    """``down_proj(silu_and_mul(gate_up_proj(x)))``."""

    def __init__(self, gate_up_proj: MergedColumnParallelLinear, act_fn: SiluAndMul, down_proj: RowParallelLinear) -> None:
        super().__init__()
        self.gate_up_proj, self.act_fn, self.down_proj = gate_up_proj, act_fn, down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class TransformersPackedMLP(ReadsThrough):
    """``hf_mlp(gate_up_proj(x))``, ``hf_mlp``'s ``gate_proj``/``up_proj`` being ``PackedSlice``s.
    Other attributes are read through to the HF module."""

    INNER = "hf_mlp"

    def __init__(self, gate_up_proj: MergedColumnParallelLinear, hf_mlp: nn.Module) -> None:
        super().__init__()
        self.gate_up_proj = gate_up_proj
        self.hf_mlp = hf_mlp

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.hf_mlp(self.gate_up_proj(x), *args, **kwargs)
