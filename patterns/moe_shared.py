"""MoE: routed experts + the shared-expert MLP added to them -> one ``moe_forward_shared``.

Unfused (Qwen-MoE style): ``moe_forward(x, logits, name) + sigmoid(x @ Wg.T) * down(silu_and_mul(x @ W13.T))``,
or without the sigmoid gate (the body with ``wg`` bound to ``None``). Fused:
``routed, shared = moe_forward_shared(x, logits, name); routed + shared``: the op runs the
layer's own ``shared_experts`` module, so a match is accepted only when the matched weights
ARE that module's parameters (``weights_are_shared_experts``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from layerpass.ops import lookup_layer
from layerpass.passes.pattern_pass import PatternPass, partial_pattern
from layerpass.patterns.common import MOE, MOE_SHARED, SILU_AND_MUL, aten, lp

if TYPE_CHECKING:
    from torch._inductor.pattern_matcher import Match


def _linear(x, w):
    return aten.mm.default(x, aten.permute.default(w, [1, 0]))


def moe_shared_pattern(x, logits, wg, w13, w2, layer_name):
    shared = _linear(SILU_AND_MUL(_linear(x, w13)), w2)
    if wg is not None:
        shared = aten.mul.Tensor(aten.sigmoid.default(_linear(x, wg)), shared)
    return aten.add.Tensor(MOE(x, logits, layer_name), shared)


def moe_shared_replacement(x, logits, wg, w13, w2, layer_name):
    routed, shared = MOE_SHARED(x, logits, layer_name)
    return aten.add.Tensor(routed, shared)


def moe_shared_example_inputs(gated: bool) -> list:
    """Fake-mode examples; no ``wg`` when ungated, no layer name."""
    x, logits = torch.empty(5, 16), torch.empty(5, 4)
    weights = ([torch.empty(1, 16)] if gated else []) + [torch.empty(64, 16), torch.empty(16, 32)]
    return [x, logits, *weights]


def weights_are_shared_experts(match: Match, layer_name: str, real_input) -> bool:
    """Every matched weight is a parameter of layer ``layer_name``'s own ``shared_experts``
    (checked on the real tensors behind the piece's placeholders)."""
    shared = getattr(lookup_layer(layer_name), "shared_experts", None)
    if shared is None:
        return False
    owned = {id(p) for p in shared.parameters()}
    weights = [real_input(match.kwargs[k]) for k in ("wg", "w13", "w2") if k in match.kwargs]
    return all(w is not None and id(w) in owned for w in weights)


class MoESharedFusionPass(PatternPass):
    """Routed experts + shared-expert MLP -> ``moe_forward_shared``, gated and ungated.

    Pieces that share a compiled artifact have the same structure, so the weight check made
    on the piece being compiled carries over to them."""

    name = "fuse_moe"
    named_op = lp.moe_forward

    def register_layer_patterns(self, layer_name: str | None) -> None:
        for gated in (True, False):
            bind = {} if gated else {"wg": None}
            self.register(partial_pattern(moe_shared_pattern, **bind), partial_pattern(moe_shared_replacement, **bind),
                          lambda g=gated: moe_shared_example_inputs(g), layer_name=layer_name,
                          extra_check=lambda match, name: weights_are_shared_experts(match, name, self.real_input))
