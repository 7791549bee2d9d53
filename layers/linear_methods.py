"""How a linear layer stores its weight and computes ``x @ W.T (+ b)``.

- ``UnquantizedLinearMethod``: a plain weight in the model dtype, ``F.linear``.
- ``Fp8LinearMethod`` (static per-tensor FP8, from ``Fp8Config``): an fp8 ``[N, K]`` weight, a
  one-element ``weight_scale`` and ``input_scale``; forward quantises the input with
  ``static_scaled_fp8_quant`` and multiplies with ``scaled_fp8_mm``. This keeps the
  producer -> quant -> fp8 mm chain in the graph that the fusion passes rewrite.

Scales are derived deterministically: the weight scale from the FULL (unsharded) weight's absmax,
the input scale from a calibration constant, so every tensor-parallel rank uses the same scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import math

from layerpass.ops import FP8_DTYPE, FP8_MAX
from layerpass.ops.quant import quantize_fp8, scaled_fp8_mm, static_scaled_fp8_quant

from .weights import check_fp8_scales, guard_fp8_scales_on_load

FP8_LINEAR_SCALES = ("weight_scale", "input_scale")


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class LinearMethodBase:
    """Creates the layer's weight tensors and applies the product."""

    def create_weights(self, layer: nn.Module, weight: torch.Tensor, full_absmax: float, dtype: torch.dtype) -> None:
        """``weight``: this rank's float32 ``[N, K]`` shard; ``full_absmax``: absmax of the full weight."""
        raise NotImplementedError

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class UnquantizedLinearMethod(LinearMethodBase):
    def create_weights(self, layer: nn.Module, weight: torch.Tensor, full_absmax: float, dtype: torch.dtype) -> None:
        layer.weight = _frozen(weight.to(dtype))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)


@dataclass(frozen=True)
class Fp8Config:
    """Static per-tensor FP8 quantisation of the linear layers that receive it.

    ``activation_absmax``: the calibrated absolute maximum of linear inputs; the static input
    scale is ``activation_absmax / 448`` (inputs beyond it saturate)."""

    activation_absmax: float = 8.0

    def __post_init__(self) -> None:
        a = self.activation_absmax
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not (a > 0 and math.isfinite(a)):
            raise ValueError(f"Fp8Config.activation_absmax must be > 0 and finite (the calibrated input absmax; "
                             f"the input scale is it / {FP8_MAX:g}), got {a!r}")

    def get_linear_method(self) -> "Fp8LinearMethod":
        return Fp8LinearMethod(self)


class Fp8LinearMethod(LinearMethodBase):
    def __init__(self, config: Fp8Config) -> None:
        self.config = config

    def create_weights(self, layer: nn.Module, weight: torch.Tensor, full_absmax: float, dtype: torch.dtype) -> None:
        weight_scale = torch.tensor([max(full_absmax, 1e-12) / FP8_MAX], dtype=torch.float32)
        layer.weight = _frozen(quantize_fp8(weight, weight_scale))
        layer.weight_scale = _frozen(weight_scale)
        layer.input_scale = _frozen(torch.tensor([self.config.activation_absmax / FP8_MAX], dtype=torch.float32))
        check_fp8_scales(layer, FP8_LINEAR_SCALES)  # a NaN / inf weight gives a NaN / inf weight scale
        guard_fp8_scales_on_load(layer, FP8_LINEAR_SCALES)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
        static_scaled_fp8_quant(q, x, layer.input_scale)
        return scaled_fp8_mm(q, layer.weight, layer.input_scale, layer.weight_scale, x.dtype, bias)


def get_linear_method(quant_config: Fp8Config | None) -> LinearMethodBase:
    """The linear method for ``quant_config`` (``None``: unquantised)."""
    if quant_config is None:
        return UnquantizedLinearMethod()
    if isinstance(quant_config, Fp8Config):
        return quant_config.get_linear_method()
    raise TypeError(f"unsupported quant_config {quant_config!r}; allowed: None or Fp8Config")
