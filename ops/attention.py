"""``unified_attention_with_output``: paged KV cache write + causal GQA attention.

The layer (resolved by name) owns ``kv_cache`` of shape
``[2, num_blocks, block_size, num_kv_heads, head_size]`` and its ``scale``, and optionally the
per-layer attention features below (read with ``getattr``: a layer without one does without it).
They are layer attributes, never op arguments, so the op's schema and every traced graph are the
same whatever their values, and layers differing only in them share one compiled piece:

- ``sliding_window: int | None``: a query at absolute position ``p`` sees the keys at positions
  ``(p - sliding_window, p]`` (the last ``sliding_window`` positions, itself included; transformers'
  ``sliding_window_overlay``: ``kv_idx > q_idx - sliding_window``);
- ``logits_soft_cap: float | None``: ``scores = cap * tanh(scores / cap)`` after scaling, before
  masking (Gemma 2);
- ``sinks: Tensor [num_heads] | None``: one learned logit per query head added to the softmax
  denominator, with no value (GPT-OSS): ``p_j = exp(s_j) / (exp(sink) + sum_k exp(s_k))``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch

from .forward_context import BatchMetadata, get_batch_metadata
from .layer_name import LayerNameType
from .library import layerpass_op
from .quant import FP8_DTYPE, _check_scale, quantize_fp8
from .state import lookup_layer


def write_kv_cache(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store this step's keys/values at their slots (``slot = block * block_size + offset``)."""
    _, nb, bs, hkv, d = kv_cache.shape
    kv_cache[0].view(nb * bs, hkv, d).index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    kv_cache[1].view(nb * bs, hkv, d).index_copy_(0, slot_mapping, value.to(kv_cache.dtype))


def _name(prefix) -> str:
    return f"attention layer {prefix!r}"


def check_scale(scale, prefix: str = "") -> float:
    """The softmax scale as a float: any finite real number (Gemma's ``query_pre_attn_scalar**-0.5``,
    Granite's ``attention_multiplier``, ...)."""
    try:
        if isinstance(scale, (bool, str, bytes)):
            raise TypeError
        value = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"{_name(prefix)}: scale must be a finite real number, got {scale!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{_name(prefix)}: scale must be a finite real number, got {scale!r}")
    return value


def check_sliding_window(sliding_window, prefix: str = "") -> int | None:
    """``None`` (full causal attention) or a positive int: the number of most recent positions,
    the query's own included, that a query attends to."""
    if sliding_window is None:
        return None
    try:
        if isinstance(sliding_window, bool):
            raise TypeError
        value = operator.index(sliding_window)
    except TypeError:
        value = None
    if value is None or value <= 0:
        raise ValueError(
            f"{_name(prefix)}: sliding_window must be None or a positive int (the last sliding_window "
            f"positions, the query's own included), got {sliding_window!r}"
        )
    return value


def check_logits_soft_cap(logits_soft_cap, prefix: str = "") -> float | None:
    """``None`` or a positive finite float ``cap``: scores become ``cap * tanh(scores / cap)``."""
    if logits_soft_cap is None:
        return None
    try:
        if isinstance(logits_soft_cap, (bool, str, bytes)):
            raise TypeError
        value = float(logits_soft_cap)
    except (TypeError, ValueError):
        value = float("nan")
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(
            f"{_name(prefix)}: logits_soft_cap must be None or a positive finite float, got {logits_soft_cap!r}"
        )
    return value


@dataclass(frozen=True)
class AttentionFeatures:
    """What one layer's attention computes besides plain causal softmax (see the module docstring)."""

    scale: float
    sliding_window: int | None = None
    logits_soft_cap: float | None = None
    sinks: torch.Tensor | None = None  # float32 [num_heads], on the query's device


def attention_features(layer, query: torch.Tensor) -> AttentionFeatures:
    """Read and check the layer's scale and optional features (shared by the CPU op and the Triton kernel)."""
    prefix = getattr(layer, "prefix", type(layer).__name__)
    sinks = getattr(layer, "sinks", None)
    if sinks is not None:
        hq = query.shape[1]
        if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point() or tuple(sinks.shape) != (hq,):
            got = f"shape {tuple(sinks.shape)} {sinks.dtype}" if isinstance(sinks, torch.Tensor) else repr(sinks)
            raise ValueError(f"{_name(prefix)}: sinks must be a float tensor of shape [{hq}] (one per query head), got {got}")
        sinks = sinks.detach().to(device=query.device, dtype=torch.float32)
    return AttentionFeatures(
        scale=check_scale(getattr(layer, "scale", None), prefix),
        sliding_window=check_sliding_window(getattr(layer, "sliding_window", None), prefix),
        logits_soft_cap=check_logits_soft_cap(getattr(layer, "logits_soft_cap", None), prefix),
        sinks=sinks,
    )


def paged_attention_ref(query: torch.Tensor, kv_cache: torch.Tensor, md: BatchMetadata, scale: float, *,
                        sliding_window: int | None = None, logits_soft_cap: float | None = None,
                        sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each request's queries over its whole cached history, with the optional
    features of the module docstring.

    Vectorised over requests by padding; returns float32 ``[num_tokens, Hq, D]``."""
    _, nb, bs, hkv, d = kv_cache.shape
    num_tokens, hq, _ = query.shape
    qsl = md.query_start_loc.long()
    q_lens = qsl[1:] - qsl[:-1]
    seq_lens = md.seq_lens.long()
    if num_tokens == 0:
        return query.new_zeros(query.shape, dtype=torch.float32)
    max_q, max_s = int(q_lens.max()), int(seq_lens.max())
    pos = torch.arange(max_s, device=query.device)
    blocks = md.block_table.long()[:, pos // bs]  # [B, max_s]
    valid_k = pos[None, :] < seq_lens[:, None]
    slots = torch.where(valid_k, blocks * bs + pos % bs, 0)
    keys = kv_cache[0].reshape(nb * bs, hkv, d)[slots].float()  # [B, S, Hkv, D]
    values = kv_cache[1].reshape(nb * bs, hkv, d)[slots].float()
    if hq != hkv:
        keys = keys.repeat_interleave(hq // hkv, dim=2)
        values = values.repeat_interleave(hq // hkv, dim=2)
    j = torch.arange(max_q, device=query.device)
    valid_q = j[None, :] < q_lens[:, None]
    tok = torch.where(valid_q, qsl[:-1, None] + j, 0)
    q = query[tok].float()  # [B, Q, Hq, D]
    q_pos = (seq_lens - q_lens)[:, None] + j  # absolute position of each query
    mask = valid_k[:, None, :] & (pos[None, None, :] <= q_pos[:, :, None])  # [B, Q, S]
    if sliding_window is not None:
        mask &= pos[None, None, :] > q_pos[:, :, None] - sliding_window
    scores = torch.einsum("bqhd,bshd->bhqs", q, keys) * scale
    if logits_soft_cap is not None:
        scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    if sinks is not None:  # one extra logit per head in the denominator, dropped from the weights
        b, _, nq, _ = scores.shape
        sink_col = sinks.to(device=scores.device, dtype=scores.dtype).view(1, hq, 1, 1).expand(b, hq, nq, 1)
        probs = torch.softmax(torch.cat([scores, sink_col], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # padded query rows are all -inf
    out = torch.einsum("bhqs,bshd->bqhd", probs, values)
    return out[valid_q]


def _check(query, key, value, output, layer, output_scale) -> None:
    for arg, x in (("query", query), ("key", key), ("value", value), ("output", output)):
        if x.dim() != 3:
            raise ValueError(f"attention: {arg} must be 3-D [tokens, heads, head_size], got shape {tuple(x.shape)}")
    if not query.is_floating_point() or query.dtype == FP8_DTYPE or key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(
            f"attention: query, key and value must share one float dtype (fp16/bf16/fp32), got "
            f"{query.dtype}, {key.dtype}, {value.dtype}"
        )
    if output.dtype not in (query.dtype, FP8_DTYPE):
        raise ValueError(f"attention: output dtype must be the query's ({query.dtype}) or {FP8_DTYPE}, got {output.dtype}")
    if output_scale is not None:
        _check_scale(output_scale)
    t, hq, d = query.shape
    if key.shape != value.shape or key.shape[0] != t or key.shape[2] != d:
        raise ValueError(f"attention: key {tuple(key.shape)} / value {tuple(value.shape)} do not match query {tuple(query.shape)}")
    if hq % key.shape[1]:
        raise ValueError(f"attention: {hq} query heads are not a multiple of {key.shape[1]} KV heads")
    if output.shape != query.shape:
        raise ValueError(f"attention: output {tuple(output.shape)} must have the query's shape {tuple(query.shape)}")
    if (output_scale is None) == (output.dtype == FP8_DTYPE):
        raise ValueError(
            f"attention: output dtype {output.dtype} requires "
            + ("an output_scale" if output.dtype == FP8_DTYPE else "output_scale=None (or an fp8 output)")
        )
    cache = getattr(layer, "kv_cache", None)
    if cache is None or cache.shape[3:] != key.shape[1:]:
        raise ValueError(
            f"attention: layer {getattr(layer, 'prefix', layer)!r} has no KV cache of shape "
            f"[2, blocks, block_size, {key.shape[1]}, {d}]"
        )


def resolve_attention(query, key, value, output, layer_name, output_scale):
    """The layer and batch metadata of one attention call, after every argument check
    (shared by the CPU op and the Triton kernel)."""
    layer = lookup_layer(layer_name, ("kv_cache", "scale"), "unified_attention_with_output")
    _check(query, key, value, output, layer, output_scale)
    md = get_batch_metadata()
    if md.slot_mapping.shape[0] != query.shape[0]:
        raise ValueError(
            f"attention: {query.shape[0]} query tokens but the batch metadata has "
            f"{md.slot_mapping.shape[0]} (slot_mapping); the step's tokens must match its metadata"
        )
    return layer, md


def _attn_fake(query, key, value, output, layer_name, output_scale=None) -> None:
    return None


@layerpass_op("unified_attention_with_output", mutates_args=("output",), fake=_attn_fake)
def unified_attention_with_output(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    output: torch.Tensor,
    layer_name: LayerNameType,
    output_scale: torch.Tensor | None = None,
) -> None:
    """``query [T, Hq, D]``, ``key``/``value [T, Hkv, D]``; writes ``output [T, Hq, D]``.

    With ``output_scale``, ``output`` is fp8 and receives the static per-tensor quantised result.
    The layer's scale, sliding window, soft cap and sinks are read from the layer itself."""
    layer, md = resolve_attention(query, key, value, output, layer_name, output_scale)
    feats = attention_features(layer, query)
    write_kv_cache(layer.kv_cache, key, value, md.slot_mapping)
    out = paged_attention_ref(query, layer.kv_cache, md, feats.scale, sliding_window=feats.sliding_window,
                              logits_soft_cap=feats.logits_soft_cap, sinks=feats.sinks)
    if output_scale is not None:
        output.copy_(quantize_fp8(out.to(query.dtype), output_scale))
    else:
        output.copy_(out)
