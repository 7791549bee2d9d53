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

from .layer_lookup import find_layer, lookup_layer
from .layer_name import LayerNameType
from .library import layerpass_op, sizes_differ
from .moe import fused_experts_ref, select_experts
from . import quant as _quant
from .quant import FP8_DTYPE, quantize_fp8


def check_moe_fp8_args(x_fp8: torch.Tensor, input_scale: torch.Tensor, router_logits: torch.Tensor, layer=None) -> None:
    """Argument checks of the FP8 MoE ops (``x_fp8``: the fp8 input, or for ``moe_forward_quant_input``
    the input before quantisation: only its shape is checked here); with the ``layer`` (when known),
    against its fp8 experts too. Run by the entry points in eager and the fake kernels at trace time."""
    if x_fp8.dim() != 2 or router_logits.dim() != 2 or sizes_differ(router_logits.shape[0], x_fp8.shape[0]):
        raise ValueError(f"fp8 moe: hidden [T, H] and router_logits [T, E] expected, got {tuple(x_fp8.shape)} "
                         f"and {tuple(router_logits.shape)}")
    _quant._check_scale(input_scale)
    if layer is None or getattr(layer, "w13_weight", None) is None or getattr(layer, "w2_weight", None) is None:
        return
    if layer.w13_weight.dtype != FP8_DTYPE or layer.w2_weight.dtype != FP8_DTYPE:
        raise ValueError(f"fp8 moe: layer {getattr(layer, 'prefix', '?')!r} has {layer.w13_weight.dtype} experts; "
                         f"moe_forward_fp8 needs {FP8_DTYPE} weights with w13_scale / w2_scale")
    if (sizes_differ(router_logits.shape[1], layer.w13_weight.shape[0])
            or sizes_differ(x_fp8.shape[1], layer.w13_weight.shape[2])):
        raise ValueError(f"fp8 moe: router_logits {tuple(router_logits.shape)} / hidden {tuple(x_fp8.shape)} do not "
                         f"match experts {tuple(layer.w13_weight.shape)}")


def check_moe_forward_fp8_args(hidden_fp8, input_scale, router_logits, layer=None) -> None:
    if hidden_fp8.dtype != FP8_DTYPE:
        raise ValueError(f"moe_forward_fp8 takes an {FP8_DTYPE} input, got {hidden_fp8.dtype}")
    check_moe_fp8_args(hidden_fp8, input_scale, router_logits, layer)


def check_moe_quant_input_args(hidden_states, input_scale, router_logits, layer=None) -> None:
    if not hidden_states.is_floating_point() or hidden_states.dtype == FP8_DTYPE:
        raise ValueError(f"moe_forward_quant_input takes a fp16/bf16/fp32 input, got {hidden_states.dtype}")
    check_moe_fp8_args(hidden_states, input_scale, router_logits, layer)


def _fp8_experts(x_fp8: torch.Tensor, input_scale: torch.Tensor, router_logits: torch.Tensor, layer,
                 out_dtype: torch.dtype) -> torch.Tensor:
    weights, ids = select_experts(router_logits, layer.top_k, layer.renormalize)
    x = x_fp8.float() * input_scale.float()
    w13 = layer.w13_weight.float() * layer.w13_scale.float()
    w2 = layer.w2_weight.float() * layer.w2_scale.float()
    return fused_experts_ref(x, w13, w2, weights, ids).to(out_dtype)


# Each op: a fake kernel that checks (trace time), a CPU kernel that does not, and the entry point
# layers call, which checks in eager (see ``ops/norm.py``'s docstring).


def _fp8_fake(hidden_fp8, input_scale, router_logits, layer_name, out_dtype):
    check_moe_forward_fp8_args(hidden_fp8, input_scale, router_logits, find_layer(layer_name))
    return hidden_fp8.new_empty(hidden_fp8.shape, dtype=out_dtype)


@layerpass_op("moe_forward_fp8", fake=_fp8_fake)
def _moe_forward_fp8_kernel(hidden_fp8: torch.Tensor, input_scale: torch.Tensor, router_logits: torch.Tensor,
                            layer_name: LayerNameType, out_dtype: torch.dtype) -> torch.Tensor:
    return _fp8_experts(hidden_fp8, input_scale, router_logits, lookup_layer(layer_name), out_dtype)


def moe_forward_fp8(hidden_fp8: torch.Tensor, input_scale: torch.Tensor, router_logits: torch.Tensor,
                    layer_name: LayerNameType, out_dtype: torch.dtype) -> torch.Tensor:
    """Routed FP8 experts on an already-quantised input: ``torch.ops.layerpass.moe_forward_fp8``
    after its argument checks."""
    if not torch.compiler.is_compiling():
        check_moe_forward_fp8_args(hidden_fp8, input_scale, router_logits, find_layer(layer_name))
    return torch.ops.layerpass.moe_forward_fp8(hidden_fp8, input_scale, router_logits, layer_name, out_dtype)


def _qin_fake(hidden_states, input_scale, router_logits, layer_name):
    check_moe_quant_input_args(hidden_states, input_scale, router_logits, find_layer(layer_name))
    return torch.empty_like(hidden_states)


@layerpass_op("moe_forward_quant_input", fake=_qin_fake)
def _moe_forward_quant_input_kernel(hidden_states: torch.Tensor, input_scale: torch.Tensor,
                                    router_logits: torch.Tensor, layer_name: LayerNameType) -> torch.Tensor:
    return _fp8_experts(quantize_fp8(hidden_states, input_scale), input_scale, router_logits,
                        lookup_layer(layer_name), hidden_states.dtype)


def moe_forward_quant_input(hidden_states: torch.Tensor, input_scale: torch.Tensor, router_logits: torch.Tensor,
                            layer_name: LayerNameType) -> torch.Tensor:
    """``moe_forward_fp8(quantize(hidden_states), ...)`` in one op; output in the input's dtype."""
    if not torch.compiler.is_compiling():
        check_moe_quant_input_args(hidden_states, input_scale, router_logits, find_layer(layer_name))
    return torch.ops.layerpass.moe_forward_quant_input(hidden_states, input_scale, router_logits, layer_name)
