"""Gated MLPs (``gate/up/down_proj``, or a packed ``gate_up_proj``) -> one packed ``gate_up_proj``.

Which layerpass form a module gets, in order: ``TransformersMLP`` where a probe shows it is
SiLU-gated (the ``silu_and_mul`` op); its own forward on a packed ``gate_up_proj`` where a probe
shows the forward takes packed projections (``TransformersPackedMLP``); a ``gate_up_proj`` packed
in the checkpoint loads as is; any other layout keeps one parallel linear per projection."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from layerpass.layers import MergedColumnParallelLinear, RowParallelLinear, SiluAndMul, get_tp_world_size

from .attention import GatheredPacked, packed_slices
from .conversion import Conversion, has_linears
from .families import UnsupportedModuleError
from .loading import load_linear
from .mlp import TransformersMLP, TransformersPackedMLP
from .probes import PACKED_CANNOT_RUN, is_silu_mlp, runs_on_packed
from .tp_plan import check_divisible


@dataclass
class GatedMlp:
    """An HF gated MLP's projections, as full ``[inter, hidden]`` gate and up weights."""

    separate: bool  # gate_proj and up_proj (else one gate_up_proj, gate rows first)
    weights: list[torch.Tensor]
    biases: list[torch.Tensor | None]
    packs: bool  # the shapes fit one MergedColumnParallelLinear and the down projection, nothing else has weights

    @property
    def hidden(self) -> int:
        return self.weights[0].shape[1]

    @property
    def inter(self) -> int:
        return self.weights[0].shape[0]

    @property
    def names(self) -> set[str]:
        return {"gate_proj", "up_proj", "down_proj"} if self.separate else {"gate_up_proj", "down_proj"}

    @classmethod
    def of(cls, module: nn.Module) -> "GatedMlp":
        separate = has_linears(module, "gate_proj", "up_proj")
        if separate:
            gate, up = module.gate_proj, module.up_proj
            packs = (gate.in_features == up.in_features and gate.out_features == up.out_features
                     and (gate.bias is None) == (up.bias is None))
            mlp = cls(True, [gate.weight, up.weight], [gate.bias, up.bias], packs)
        else:
            gu = module.gate_up_proj
            biases = list(gu.bias.chunk(2)) if gu.bias is not None else [None, None]
            mlp = cls(False, list(gu.weight.chunk(2)), biases, gu.out_features % 2 == 0)
        down = module.down_proj
        mlp.packs = (mlp.packs and down.in_features == mlp.inter and down.out_features == mlp.hidden
                     and _others_hold_no_weights(module, mlp.names))
        return mlp


def _others_hold_no_weights(module: nn.Module, names: set[str]) -> bool:
    others = [m for n, m in module.named_children() if n not in names]
    return not any(True for m in others for _ in m.parameters()) and not any(True for _ in module.parameters(recurse=False))


def convert_mlp(conv: Conversion, module: nn.Module, path: str, reduce_results: bool = True) -> nn.Module | None:
    """A gated MLP's replacement (None: the module is kept, its children converted). A shared
    expert passes ``reduce_results=False``: its partial sums are reduced with the experts'."""
    mlp = GatedMlp.of(module)
    silu = mlp.packs and conv.probes.run("silu_mlp", module, lambda: is_silu_mlp(module, mlp.weights, mlp.biases, conv.dtype))
    if silu:
        check_divisible(mlp.inter, f"{path}: intermediate size")
        gather = None
    else:
        if not reduce_results and get_tp_world_size() > 1:
            raise UnsupportedModuleError(f"from_transformers: {path!r} ({type(module).__name__}) is a shared expert that "
                                         f"is not a SiLU-gated MLP; under tensor parallelism its partial sums cannot be "
                                         f"reduced with the experts'")
        gather = conv.plan.packed_gather(path, sorted(mlp.names - {"down_proj"}))
        packable = mlp.packs and gather is not None and (
            not mlp.separate or conv.probes.run("packed_mlp", module, lambda: runs_on_packed(module, conv.dtype),
                                                PACKED_CANNOT_RUN))
        if not packable:  # one parallel linear per projection
            conv.convert_children(module, path)
            return None
    # the one packed gate/up projection every form runs on
    gate_up = MergedColumnParallelLinear(mlp.hidden, [mlp.inter, mlp.inter], bias=mlp.biases[0] is not None,
                                         quant_config=conv.quant_config, prefix=f"{path}.gate_up_proj",
                                         params_dtype=conv.dtype)
    load_linear(gate_up, mlp.weights, mlp.biases)
    down = module.down_proj
    if silu:
        down_proj = RowParallelLinear(mlp.inter, mlp.hidden, bias=down.bias is not None, reduce_results=reduce_results,
                                      quant_config=conv.quant_config, prefix=f"{path}.down_proj", params_dtype=conv.dtype)
        load_linear(down_proj, [down.weight], [down.bias])
        return TransformersMLP(gate_up, SiluAndMul(prefix=f"{path}.act_fn"), down_proj)
    if mlp.separate:  # the HF forward runs on slices of the packed output
        module.gate_proj, module.up_proj = packed_slices(gate_up, gather=gather)
    else:  # packed in the checkpoint already: loaded as is
        module.gate_up_proj = GatheredPacked(gate_up) if gather and gate_up.tp_size > 1 else gate_up
    module.down_proj = conv.linear(down, f"{path}.down_proj", style=None if reduce_results else "rowwise",
                                   reduce_results=reduce_results)
    conv.convert_children(module, path)
    return TransformersPackedMLP(gate_up, module) if mlp.separate else None
