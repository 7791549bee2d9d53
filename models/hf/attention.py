"""The ``"layerpass"`` attention implementation for Hugging Face models, and the attention module
that a converted model's decoder layers call.

``layerpass_attention_forward`` has the signature of a transformers attention function
(``AttentionInterface``): ``(module, query, key, value, attention_mask, *, scaling, dropout, ...)``
with ``query [1, Hq, T, D]``. A converted model runs every step as ONE flattened sequence of the
batch's tokens (batch 1), so the function ignores HF's mask and instead calls the module's
layerpass ``Attention`` (``module.attn``), whose op, ``unified_attention_with_output``, writes the
paged KV cache and masks per request from the step's batch metadata, looked up by LayerName.

Registration (``register_attention_function``) is lazy and idempotent: importing layerpass must
not import transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from layerpass.layers import Attention, QKVParallelLinear, RowParallelLinear

ATTN_IMPLEMENTATION = "layerpass"


def layerpass_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                attention_mask: torch.Tensor | None, scaling: float | None = None,
                                dropout: float = 0.0, sliding_window: int | None = None,
                                **kwargs: Any) -> tuple[torch.Tensor, None]:
    """HF layout in (``[1, H, T, D]``), HF layout out (``[1, T, Hq, D]``, no attention weights)."""
    attn = getattr(module, "attn", None)
    if not isinstance(attn, Attention):
        raise TypeError(
            f"attention implementation {ATTN_IMPLEMENTATION!r} runs on a layerpass Attention at `module.attn`; "
            f"{type(module).__name__} has none: convert the model with layerpass.models.from_transformers"
        )
    if sliding_window is not None:
        raise NotImplementedError(f"{attn.prefix}: sliding-window attention is not supported by {ATTN_IMPLEMENTATION!r}")
    if dropout:
        raise ValueError(f"{attn.prefix}: attention dropout {dropout} is not supported (inference only)")
    if scaling is not None and float(scaling) != attn.scale:
        raise ValueError(f"{attn.prefix}: scaling {scaling} differs from the layer's scale {attn.scale}")
    if query.dim() != 4 or query.shape[0] != 1:
        raise ValueError(f"{attn.prefix}: expected query [1, heads, tokens, head_size] (one flattened batch), "
                         f"got {tuple(query.shape)}")
    t = query.shape[2]
    # [1, H, T, D] -> [T, H * D]: the layer's op takes flat per-token rows.
    q = query.transpose(1, 2).reshape(t, -1)
    k = key.transpose(1, 2).reshape(t, -1)
    v = value.transpose(1, 2).reshape(t, -1)
    out = attn(q, k, v)
    return out.view(1, t, -1, attn.head_size), None


def register_attention_function() -> None:
    """Register ``"layerpass"`` with transformers' ``AttentionInterface`` (idempotent)."""
    from transformers import AttentionInterface

    if AttentionInterface._global_mapping.get(ATTN_IMPLEMENTATION) is not layerpass_attention_forward:
        AttentionInterface.register(ATTN_IMPLEMENTATION, layerpass_attention_forward)


def _attention_function() -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS.get_interface(ATTN_IMPLEMENTATION, layerpass_attention_forward)


class TransformersAttention(nn.Module):
    """Replaces an HF self-attention module: packed ``qkv_proj`` -> optional per-head q/k norm ->
    HF rotary (the model's own ``apply_rotary_pos_emb`` on the cos/sin it passes in) -> the
    ``"layerpass"`` attention function -> ``o_proj``. Same call signature and return as HF's."""

    def __init__(self, qkv_proj: QKVParallelLinear, o_proj: RowParallelLinear, attn: Attention,
                 apply_rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]], scaling: float,
                 q_norm: nn.Module | None = None, k_norm: nn.Module | None = None) -> None:
        super().__init__()
        self.qkv_proj, self.o_proj, self.attn = qkv_proj, o_proj, attn
        self.q_norm, self.k_norm = q_norm, k_norm
        self.q_size, self.kv_size = qkv_proj.q_size, qkv_proj.kv_size
        self.head_dim = qkv_proj.head_size
        self.scaling = scaling
        self.apply_rotary = apply_rotary
        self.sliding_window = None

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, past_key_values: Any = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
        if past_key_values is not None:
            raise ValueError(f"{self.attn.prefix}: a converted model keeps its KV cache in the layerpass layers; "
                             f"call it without past_key_values (use_cache=False)")
        lead = hidden_states.shape[:-1]
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # explicit head counts, no -1: the token count may be an unbacked symbol under compile
        q = q.reshape(*lead, self.q_size // self.head_dim, self.head_dim)
        k = k.reshape(*lead, self.kv_size // self.head_dim, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.reshape(*lead, self.kv_size // self.head_dim, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = self.apply_rotary(q, k, cos, sin)
        out, weights = _attention_function()(self, q, k, v, attention_mask, scaling=self.scaling, dropout=0.0,
                                             sliding_window=self.sliding_window)
        return self.o_proj(out.reshape(*lead, -1)), weights
