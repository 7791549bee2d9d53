"""``RMSNorm`` over the ``rms_norm`` / ``fused_add_rms_norm`` ops (single graph nodes the
norm+quant fusion matches)."""

from __future__ import annotations

import torch
from torch import nn

from layerpass.ops.norm import fused_add_rms_norm, rms_norm

from .pluggable import PluggableLayer
from .weights import init_normal


@PluggableLayer.register("rms_norm")
class RMSNorm(PluggableLayer):
    """``forward(x)`` -> normed; ``forward(x, residual)`` -> ``(norm(x + residual), x + residual)``."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, params_dtype: torch.dtype | None = None, prefix: str = "") -> None:
        super().__init__(prefix)
        if hidden_size <= 0 or not eps > 0:
            raise ValueError(f"RMSNorm {prefix!r}: hidden_size must be > 0 and eps > 0, got {hidden_size}, {eps}")
        self.hidden_size = hidden_size
        self.variance_epsilon = eps
        # Near one but not exactly: tests then see a wrong or missing weight.
        weight = init_normal(prefix, "weight", (hidden_size,), std=0.05, mean=1.0)
        self.weight = nn.Parameter(weight.to(params_dtype or torch.get_default_dtype()), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return rms_norm(x, self.weight, self.variance_epsilon)
        return fused_add_rms_norm(x, residual, self.weight, self.variance_epsilon)


@PluggableLayer.register("gemma_rms_norm")
class GemmaRMSNorm(RMSNorm):
    """RMS norm scaled by ``1 + w`` (Gemma's convention: a zero weight is the identity scale).

    The same ``rms_norm`` op as ``RMSNorm`` (so the norm+quant fusion matches it too): the layer
    holds the effective scale ``1 + w`` as its ``weight``, in float32 whatever the model dtype,
    because Gemma computes ``normed(x.float()) * (1 + w.float())`` in float32 before casting back
    (the op multiplies by ``weight.float()`` in float32 too), so a bf16 model rounds exactly like
    Hugging Face's. Load a Gemma checkpoint's ``w`` with ``load_offset_weight``."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, params_dtype: torch.dtype | None = None, prefix: str = "") -> None:
        super().__init__(hidden_size, eps, torch.float32, prefix)

    def load_offset_weight(self, weight: torch.Tensor) -> None:
        """Set the scale from a checkpoint weight ``w`` (shape ``[hidden_size]``): ``1 + w`` in float32."""
        if tuple(weight.shape) != (self.hidden_size,):
            raise ValueError(f"GemmaRMSNorm {self.prefix!r}: weight must have shape ({self.hidden_size},), got {tuple(weight.shape)}")
        with torch.no_grad():
            self.weight.copy_(1.0 + weight.detach().float())
