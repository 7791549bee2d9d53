"""MoE: routed experts + the shared-expert MLP added to them -> one ``moe_forward_shared``.

Unfused (Qwen-MoE style): ``moe_forward(x, logits, name) + sigmoid(x @ Wg.T) * down(silu_and_mul(x @ W13.T))``,
or without the sigmoid gate. Fused: ``routed, shared = moe_forward_shared(x, logits, name); routed + shared``:
the op runs the layer's own ``shared_experts`` module, so the pass only fires after checking that the
matched weights ARE that module's parameters (see ``passes.fusion.MoEFusionPass``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .common import MOE, MOE_SHARED, SILU_AND_MUL, aten


def _mlp(x, w13, w2):
    return aten.mm.default(SILU_AND_MUL(aten.mm.default(x, aten.permute.default(w13, [1, 0]))), aten.permute.default(w2, [1, 0]))


def moe_shared_pattern(layer_name: str | None, gated: bool) -> tuple[Callable, Callable]:
    """Closures: with ``layer_name=None`` the name is the pattern's last input (hoisted LayerName)."""

    def shared(x, wg, w13, w2):
        out = _mlp(x, w13, w2)
        return aten.mul.Tensor(aten.sigmoid.default(aten.mm.default(x, aten.permute.default(wg, [1, 0]))), out) if gated else out

    if layer_name is None:
        if gated:
            def pattern(x, logits, wg, w13, w2, layer_name):
                return aten.add.Tensor(MOE(x, logits, layer_name), shared(x, wg, w13, w2))

            def replacement(x, logits, wg, w13, w2, layer_name):
                routed, shared_out = MOE_SHARED(x, logits, layer_name)
                return aten.add.Tensor(routed, shared_out)
        else:
            def pattern(x, logits, w13, w2, layer_name):
                return aten.add.Tensor(MOE(x, logits, layer_name), shared(x, None, w13, w2))

            def replacement(x, logits, w13, w2, layer_name):
                routed, shared_out = MOE_SHARED(x, logits, layer_name)
                return aten.add.Tensor(routed, shared_out)
        return pattern, replacement

    if gated:
        def pattern_const(x, logits, wg, w13, w2):
            return aten.add.Tensor(MOE(x, logits, layer_name), shared(x, wg, w13, w2))

        def replacement_const(x, logits, wg, w13, w2):
            routed, shared_out = MOE_SHARED(x, logits, layer_name)
            return aten.add.Tensor(routed, shared_out)
    else:
        def pattern_const(x, logits, w13, w2):
            return aten.add.Tensor(MOE(x, logits, layer_name), shared(x, None, w13, w2))

        def replacement_const(x, logits, w13, w2):
            routed, shared_out = MOE_SHARED(x, logits, layer_name)
            return aten.add.Tensor(routed, shared_out)
    return pattern_const, replacement_const


def moe_example_inputs(gated: bool, layer_name: object | None) -> list:
    x, logits = torch.empty(5, 16), torch.empty(5, 4)
    weights = ([torch.empty(1, 16)] if gated else []) + [torch.empty(64, 16), torch.empty(16, 32)]
    return [x, logits, *weights] + ([layer_name] if layer_name is not None else [])
