"""Dense MLPs of converted Hugging Face models.

``TransformersMLP`` packs HF's ``gate_proj`` / ``up_proj`` into one ``MergedColumnParallelLinear``
followed by the ``silu_and_mul`` layer (the shape the act+quant and MoE fusions match); it needs
a SiLU activation. Any other activation keeps the HF module and its forward, with its three
projections swapped for column/row-parallel linears (``convert.py`` does that).
"""

from __future__ import annotations

import torch
from torch import nn

from layerpass.layers import MergedColumnParallelLinear, RowParallelLinear, SiluAndMul

SILU_ACTIVATIONS = ("silu", "swish")


class TransformersMLP(nn.Module):
    """``down_proj(silu_and_mul(gate_up_proj(x)))``."""

    def __init__(self, gate_up_proj: MergedColumnParallelLinear, act_fn: SiluAndMul, down_proj: RowParallelLinear) -> None:
        super().__init__()
        self.gate_up_proj, self.act_fn, self.down_proj = gate_up_proj, act_fn, down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))
