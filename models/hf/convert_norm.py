"""RMS norms -> ``RMSNorm`` or ``GemmaRMSNorm`` (``1 + w``), where a float32 probe shows the same numbers."""

from __future__ import annotations

from torch import nn

from layerpass.layers import RMSNorm
from layerpass.layers.layernorm import GemmaRMSNorm

from .conversion import Conversion
from .loading import copy_param
from .probes import rms_norm_kind


def convert_rms_norm(conv: Conversion, module: nn.Module, path: str) -> nn.Module | None:
    """The layerpass norm computing what ``module`` does, or None: not a norm of one weight and a
    float eps (no buffers, no children), or one that computes something else (any other norm stays
    an HF module)."""
    params = dict(module.named_parameters())
    eps = next((getattr(module, a) for a in ("variance_epsilon", "eps") if isinstance(getattr(module, a, None), float)),
               None)
    if (set(params) != {"weight"} or params["weight"].dim() != 1 or eps is None or any(True for _ in module.buffers())
            or any(True for _ in module.children())):
        return None
    kind = conv.probes.run("rms_norm", module, lambda: rms_norm_kind(module, eps))
    if not kind:
        return None
    weight = params["weight"]
    if kind == "gemma":
        norm = GemmaRMSNorm(weight.shape[0], eps, prefix=path)
        norm.load_offset_weight(weight)
        return norm
    norm = RMSNorm(weight.shape[0], eps, conv.dtype, prefix=path)
    copy_param(f"{path}.weight", norm.weight, weight)
    return norm
