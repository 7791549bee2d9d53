"""Give every HF attention module the dry run saw its layerpass ``Attention`` (``module.attn``),
built from what the module passed the attention function."""

from __future__ import annotations

from typing import Any

import torch

from layerpass.layers import Attention, CacheConfig, get_tp_rank, get_tp_world_size
from layerpass.layers.weights import shard

from .attention_dry_run import AttentionCall
from .families import UnsupportedModuleError
from .loading import copy_param

# keyword arguments an attention module may pass the attention function that change nothing here
HARMLESS_ATTENTION_KWARGS = {"position_ids", "use_cache", "output_attentions", "cache_position", "layer_idx"}


def attach_attention(calls: list[AttentionCall], paths: dict[int, str], cache_config: CacheConfig,
                     dtype: torch.dtype, model_name: str) -> None:
    """Set ``module.attn`` on the module of every call; ``UnsupportedModuleError`` for a module
    whose attention layerpass does not compute (bidirectional, unequal key and value head sizes,
    dropout, features it does not implement) or that is not one layer (outside the base model,
    called twice per forward)."""
    if not calls:
        raise UnsupportedModuleError(f"from_transformers: no module of {model_name} called the "
                                     f"attention function in a dry run; nothing to run layerpass attention on")
    seen: set[int] = set()
    for call in calls:
        module = call.module
        path = paths.get(id(module))
        what = f"{path or type(module).__name__!r} ({type(module).__name__})"
        if path is None:
            raise UnsupportedModuleError(f"from_transformers: attention module {what} is not part of the base model")
        if id(module) in seen:
            raise UnsupportedModuleError(f"from_transformers: attention module {what} is called more than once per "
                                         f"forward; layerpass gives each attention layer one KV cache")
        seen.add(id(module))
        if getattr(module, "is_causal", True) is False:
            raise UnsupportedModuleError(f"from_transformers: {what} uses bidirectional attention (is_causal=False); "
                                         f"the layerpass attention is causal")
        if call.head_size != call.value_head_size:
            raise UnsupportedModuleError(f"from_transformers: {what} has key head size {call.head_size} and value head "
                                         f"size {call.value_head_size}; the layerpass attention needs them equal")
        module.attn = _attention_for(call, f"{path}.attn", what, cache_config, dtype)


def _attention_for(call: AttentionCall, prefix: str, what: str, cache_config: CacheConfig,
                   dtype: torch.dtype) -> Attention:
    """The ``Attention`` computing what ``call`` asked for: its scale, sliding window, soft-cap, sinks."""
    kwargs = dict(call.kwargs)
    scaling = kwargs.pop("scaling", None)
    dropout = kwargs.pop("dropout", 0.0)
    sliding_window = kwargs.pop("sliding_window", None) or None
    softcap = kwargs.pop("softcap", None) or None
    sinks = kwargs.pop("s_aux", None)
    unknown = sorted(k for k, val in kwargs.items() if k not in HARMLESS_ATTENTION_KWARGS and val is not None
                     and val is not False)
    if unknown:
        raise UnsupportedModuleError(f"from_transformers: {what} passes the attention function {unknown}, which "
                                     f"the layerpass attention does not implement")
    if dropout:
        raise UnsupportedModuleError(f"from_transformers: {what} uses attention dropout {dropout}")
    features: dict[str, Any] = {}
    if sliding_window is not None:
        features["sliding_window"] = int(sliding_window)
    if softcap is not None:
        features["logits_soft_cap"] = float(softcap)
    if sinks is not None:
        features["use_sinks"] = True
    scale = float(scaling) if scaling is not None else call.head_size ** -0.5
    try:
        attn = Attention(call.num_heads, call.head_size, scale, call.num_kv_heads, prefix=prefix,
                         cache=cache_config, dtype=dtype, **features)
    except TypeError as e:
        raise UnsupportedModuleError(f"from_transformers: {what} needs attention features {sorted(features)} "
                                     f"this layerpass Attention does not take ({e})") from e
    if sinks is not None:
        _load_sinks(attn, sinks, what)
    return attn


def _load_sinks(attn: Attention, sinks: torch.Tensor, what: str) -> None:
    full = sinks.detach().float().reshape(-1)
    tp = get_tp_world_size()
    if full.numel() == attn.num_heads:
        local = full
    elif full.numel() == attn.num_heads * tp:
        local = shard(full, 0, get_tp_rank(), tp)
    else:
        raise UnsupportedModuleError(f"from_transformers: {what} passes {full.numel()} attention sinks for "
                                     f"{attn.num_heads} heads per rank")
    copy_param(f"{attn.prefix}.sinks", attn.sinks, local.to(attn.sinks.dtype))
