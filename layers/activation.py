"""``SiluAndMul`` over the ``silu_and_mul`` op (the act+quant fusion's anchor)."""

from __future__ import annotations

import torch

from layerpass.ops.norm import silu_and_mul

from .pluggable import PluggableLayer


@PluggableLayer.register("silu_and_mul")
class SiluAndMul(PluggableLayer):
    """``x [..., 2d] -> silu(x[..., :d]) * x[..., d:]``."""

    def __init__(self, prefix: str = "") -> None:
        super().__init__(prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)
