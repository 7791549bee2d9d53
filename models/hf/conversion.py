"""``Conversion``: what every step of one ``from_transformers`` call builds layerpass layers with."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from layerpass.layers import ColumnParallelLinear, Fp8Config, ReplicatedLinear, RowParallelLinear

from .loading import load_linear
from .probes import Probes
from .tp_plan import COLWISE, COLWISE_GATHER, ROWWISE, ROWWISE_SPLIT, TPPlan


@dataclass
class Conversion:
    """The settings of one conversion (the HF config, the weights' dtype, quantisation, the
    tensor-parallel plan), its probe results, and the walk: ``convert_children(module, path)``
    converts the children a step leaves to their HF module (``walk.ModuleWalker``)."""

    config: Any
    dtype: torch.dtype
    quant_config: Fp8Config | None
    plan: TPPlan
    probes: Probes
    convert_children: Callable[[nn.Module, str], None]

    def linear(self, lin: nn.Linear, path: str, style: str | None = None, reduce_results: bool = True) -> nn.Module:
        """``lin`` as the layerpass linear its tensor-parallel style asks for (default: the plan's)."""
        style = self.plan.style(path) if style is None else style
        bias = lin.bias is not None
        common = dict(quant_config=self.quant_config, prefix=path, params_dtype=self.dtype)
        if style in COLWISE or style in COLWISE_GATHER:
            layer: nn.Module = ColumnParallelLinear(lin.in_features, lin.out_features, bias=bias,
                                                    gather_output=style in COLWISE_GATHER, **common)
        elif style in ROWWISE or style in ROWWISE_SPLIT:
            layer = RowParallelLinear(lin.in_features, lin.out_features, bias=bias, input_is_parallel=style in ROWWISE,
                                      reduce_results=reduce_results, **common)
        else:
            layer = ReplicatedLinear(lin.in_features, lin.out_features, bias=bias, **common)
        load_linear(layer, [lin.weight], [lin.bias])
        return layer


def has_linears(module: nn.Module, *names: str) -> bool:
    """Every child ``names`` of ``module`` is a plain ``torch.nn.Linear``."""
    return all(type(module._modules.get(n)) is nn.Linear for n in names)
