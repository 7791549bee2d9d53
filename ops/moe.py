"""Mixture-of-experts ops: softmax top-k routing and SiLU-gated experts, grouped per expert.

The layer (resolved by name) owns ``w13_weight [E, 2I, H]`` (gate and up stacked),
``w2_weight [E, H, I]``, ``top_k``, ``renormalize`` and, for ``moe_forward_shared``,
``shared_experts`` (a module applied to the same hidden states).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layer_lookup import find_layer, lookup_layer
from .layer_name import LayerNameType
from .library import layerpass_op, sizes_differ


MOE_LAYER_ATTRS = ("w13_weight", "w2_weight", "top_k", "renormalize")  # what the MoE ops read from the layer


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts, keep the top-k; returns float32 weights and int64 ids ``[T, k]``."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_experts_ref(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """Group (token, expert) pairs by expert, run each expert once on its tokens, scatter-add.

    Loops over experts, never over tokens."""
    num_tokens, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    k = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    flat_w = topk_weights.reshape(-1).float()
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=x.device)
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        pairs = order[start : start + c]
        start += c
        tokens = pairs // k
        h = x[tokens].float() @ w13[e].float().t()
        act = F.silu(h[:, :inter]) * h[:, inter:]
        y = act @ w2[e].float().t()
        out.index_add_(0, tokens, y * flat_w[pairs, None])
    return out.to(x.dtype)


def check_moe_args(hidden_states: torch.Tensor, router_logits: torch.Tensor, layer=None) -> None:
    """Argument checks of the MoE ops; with the ``layer`` (when known), against its experts too.
    Run by the entry points in eager and the fake kernels at trace time, never by the kernels."""
    if (hidden_states.dim() != 2 or router_logits.dim() != 2
            or sizes_differ(router_logits.shape[0], hidden_states.shape[0])):
        raise ValueError(
            f"moe: hidden_states [T, H] and router_logits [T, E] expected, got "
            f"{tuple(hidden_states.shape)} and {tuple(router_logits.shape)}"
        )
    if not hidden_states.is_floating_point() or not router_logits.is_floating_point():
        raise ValueError(f"moe: hidden_states and router_logits must be float, got {hidden_states.dtype} and {router_logits.dtype}")
    if layer is None or getattr(layer, "w13_weight", None) is None:
        return
    num_experts, _, hidden = layer.w13_weight.shape
    if sizes_differ(router_logits.shape[1], num_experts):
        raise ValueError(f"moe: router_logits has {router_logits.shape[1]} experts, layer has {num_experts}")
    if sizes_differ(hidden_states.shape[1], hidden):
        raise ValueError(f"moe: hidden_states has hidden size {hidden_states.shape[1]}, the layer's experts take {hidden}")
    top_k = getattr(layer, "top_k", None)
    if top_k is not None and not 1 <= top_k <= num_experts:
        raise ValueError(f"moe: top_k must be in [1, {num_experts}] (the number of experts), got {top_k}")


def moe_routed(hidden_states: torch.Tensor, router_logits: torch.Tensor, layer) -> torch.Tensor:
    weights, ids = select_experts(router_logits, layer.top_k, layer.renormalize)
    return fused_experts_ref(hidden_states, layer.w13_weight, layer.w2_weight, weights, ids)


# Each op: a fake kernel that checks (trace time), a CPU kernel that does not, and the entry point
# layers call, which checks in eager (see ``ops/norm.py``'s docstring).


def _moe_fake(hidden_states, router_logits, layer_name):
    check_moe_args(hidden_states, router_logits, find_layer(layer_name))
    return torch.empty_like(hidden_states)


@layerpass_op("moe_forward", fake=_moe_fake)
def _moe_forward_kernel(hidden_states: torch.Tensor, router_logits: torch.Tensor, layer_name: LayerNameType) -> torch.Tensor:
    return moe_routed(hidden_states, router_logits, lookup_layer(layer_name, MOE_LAYER_ATTRS, "moe_forward"))


def moe_forward(hidden_states: torch.Tensor, router_logits: torch.Tensor, layer_name: LayerNameType) -> torch.Tensor:
    """Routed experts of layer ``layer_name`` (no shared experts): ``torch.ops.layerpass.moe_forward``
    after its argument checks."""
    if not torch.compiler.is_compiling():
        check_moe_args(hidden_states, router_logits, find_layer(layer_name))
    return torch.ops.layerpass.moe_forward(hidden_states, router_logits, layer_name)


def shared_experts_of(layer):
    """The layer's shared-experts module; a clear error when it has none."""
    if getattr(layer, "shared_experts", None) is None:
        raise ValueError(f"moe_forward_shared: layer {getattr(layer, 'prefix', '?')!r} has no shared_experts")
    return layer.shared_experts


def _shared_fake(hidden_states, router_logits, layer_name):
    check_moe_args(hidden_states, router_logits, find_layer(layer_name))
    return torch.empty_like(hidden_states), torch.empty_like(hidden_states)


@layerpass_op("moe_forward_shared", fake=_shared_fake)
def _moe_forward_shared_kernel(
    hidden_states: torch.Tensor, router_logits: torch.Tensor, layer_name: LayerNameType
) -> tuple[torch.Tensor, torch.Tensor]:
    layer = lookup_layer(layer_name, MOE_LAYER_ATTRS, "moe_forward_shared")
    shared = shared_experts_of(layer)
    return moe_routed(hidden_states, router_logits, layer), shared(hidden_states)


def moe_forward_shared(
    hidden_states: torch.Tensor, router_logits: torch.Tensor, layer_name: LayerNameType
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(routed_output, shared_experts_output)`` of layer ``layer_name``:
    ``torch.ops.layerpass.moe_forward_shared`` after its argument checks."""
    if not torch.compiler.is_compiling():
        check_moe_args(hidden_states, router_logits, find_layer(layer_name))
    return torch.ops.layerpass.moe_forward_shared(hidden_states, router_logits, layer_name)
