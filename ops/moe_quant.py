"""FP8 MoE ops: static per-tensor FP8 activations and expert weights.

The layer (resolved by name) owns fp8 ``w13_weight [E, 2I, H]`` / ``w2_weight [E, H, I]`` with
one-element float32 ``w13_scale`` / ``w2_scale``, plus ``top_k`` and ``renormalize``.

- ``moe_forward_fp8(hidden_fp8, input_scale, router_logits, layer_name, out_dtype)``: the input
  was quantised by a separate ``static_scaled_fp8_quant`` (what an FP8 ``FusedMoE`` emits).
- ``moe_forward_quant_input(hidden_states, input_scale, router_logits, layer_name)``: quantises
  the input itself; the fusion pass folds quant -> ``moe_forward_fp8`` into it, saving the fp8
  round trip through memory. Both compute the same numbers.
"""

from __future__ import annotations

import torch

from .layer_name import LayerNameType
from .library import layerpass_op
from .moe import fused_experts_ref, select_experts
from .quant import FP8_DTYPE, _check_scale, quantize_fp8
from .state import lookup_layer


def _fp8_experts(x_fp8: torch.Tensor, input_scale: torch.Tensor, router_logits: torch.Tensor, layer,
                 out_dtype: torch.dtype) -> torch.Tensor:
    if x_fp8.dim() != 2 or router_logits.dim() != 2 or router_logits.shape[0] != x_fp8.shape[0]:
        raise ValueError(f"fp8 moe: hidden [T, H] and router_logits [T, E] expected, got {tuple(x_fp8.shape)} "
                         f"and {tuple(router_logits.shape)}")
    if layer.w13_weight.dtype != FP8_DTYPE or layer.w2_weight.dtype != FP8_DTYPE:
        raise ValueError(f"fp8 moe: layer {getattr(layer, 'prefix', '?')!r} has {layer.w13_weight.dtype} experts; "
                         f"moe_forward_fp8 needs {FP8_DTYPE} weights with w13_scale / w2_scale")
    if router_logits.shape[1] != layer.w13_weight.shape[0] or x_fp8.shape[1] != layer.w13_weight.shape[2]:
        raise ValueError(f"fp8 moe: router_logits {tuple(router_logits.shape)} / hidden {tuple(x_fp8.shape)} do not "
                         f"match experts {tuple(layer.w13_weight.shape)}")
    _check_scale(input_scale)
    weights, ids = select_experts(router_logits, layer.top_k, layer.renormalize)
    x = x_fp8.float() * input_scale.float()
    w13 = layer.w13_weight.float() * layer.w13_scale.float()
    w2 = layer.w2_weight.float() * layer.w2_scale.float()
    return fused_experts_ref(x, w13, w2, weights, ids).to(out_dtype)


def _fp8_fake(hidden_fp8, input_scale, router_logits, layer_name, out_dtype):
    return hidden_fp8.new_empty(hidden_fp8.shape, dtype=out_dtype)


@layerpass_op("moe_forward_fp8", fake=_fp8_fake)
def moe_forward_fp8(hidden_fp8: torch.Tensor, input_scale: torch.Tensor, router_logits: torch.Tensor,
                    layer_name: LayerNameType, out_dtype: torch.dtype) -> torch.Tensor:
    """Routed FP8 experts on an already-quantised input."""
    if hidden_fp8.dtype != FP8_DTYPE:
        raise ValueError(f"moe_forward_fp8 takes an {FP8_DTYPE} input, got {hidden_fp8.dtype}")
    return _fp8_experts(hidden_fp8, input_scale, router_logits, lookup_layer(layer_name), out_dtype)


def _qin_fake(hidden_states, input_scale, router_logits, layer_name):
    return torch.empty_like(hidden_states)


@layerpass_op("moe_forward_quant_input", fake=_qin_fake)
def moe_forward_quant_input(hidden_states: torch.Tensor, input_scale: torch.Tensor, router_logits: torch.Tensor,
                            layer_name: LayerNameType) -> torch.Tensor:
    """``moe_forward_fp8(quantize(hidden_states), ...)`` in one op; output in the input's dtype."""
    if not hidden_states.is_floating_point() or hidden_states.dtype == FP8_DTYPE:
        raise ValueError(f"moe_forward_quant_input takes a fp16/bf16/fp32 input, got {hidden_states.dtype}")
    _check_scale(input_scale)
    return _fp8_experts(quantize_fp8(hidden_states, input_scale), input_scale, router_logits,
                        lookup_layer(layer_name), hidden_states.dtype)
