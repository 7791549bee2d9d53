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

from .batch_metadata import BatchMetadata
from .forward_context import get_batch_metadata
from .layer_lookup import find_layer, lookup_layer
from .layer_name import LayerNameType
from .library import layerpass_op, sizes_differ
from . import quant as _quant
from .quant import FP8_DTYPE, quantize_fp8


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


@dataclass(frozen=True)
class _Group:
    """The requests one batched attention computation covers: the decodes (one query each) or the
    prefills (queries padded to the longest), ``R`` requests, ``Q`` query rows and ``S`` key
    slots each. Index tensors only, built once per step for each (block size, window) (``_plan``)."""

    start: int  # first token
    num_tokens: int
    num_reqs: int  # R
    q_len: int  # Q
    kv_len: int  # S, whole cache blocks
    tokens: torch.Tensor | None  # [R, Q] token of each query row (a padding row repeats the last); None: Q = 1
    blocks: torch.Tensor  # [R * S / block_size] cache block of each key block (unused ones read block 0)
    hidden: torch.Tensor  # bool [R, Q, S]: key slot not seen by the query row
    past_end: torch.Tensor | None  # key slots past their sequence: indices into R * S (CPU), else bool [R, S]
    rows: tuple[torch.Tensor, torch.Tensor] | None  # (request, row) of each token; None: Q = 1


def _on_host(t: torch.Tensor) -> bool:
    """Whether the plan may read ``t``'s values: a CPU tensor, where that costs nothing. On any other
    device it uses only what the host knows (shapes, counts), so it never waits on the device."""
    return t.device.type == "cpu"


def _host_max(t: torch.Tensor, bound: int) -> int:
    """``max(t)`` (0 if empty) where it can be read (``_on_host``), else the host-known ``bound``."""
    if t.numel() == 0:
        return 0
    return int(t.max()) if _on_host(t) else bound


def _group(start: int, num_tokens: int, q_lens: torch.Tensor, seq_lens: torch.Tensor, table: torch.Tensor,
           max_q: int, bs: int, sliding_window: int | None, starts: torch.Tensor | None = None) -> _Group:
    """One group's indices: ``q_lens``/``seq_lens`` int64 ``[R]``, ``table [R, max_blocks]``, and with
    ``max_q > 1`` the requests' query offsets ``starts`` int64 ``[R + 1]``."""
    dev = seq_lens.device
    r = seq_lens.shape[0]
    width = table.shape[1]
    nblk = -(-_host_max(seq_lens, width * bs) // bs)
    if nblk > width:
        raise ValueError(f"attention: block_table has {width} blocks per request, a sequence needs {nblk} "
                         f"(block size {bs})")
    j = torch.arange(max_q, device=dev)
    row = torch.minimum(j[None, :], q_lens[:, None] - 1)  # [R, Q]; a padding row repeats the last query
    q_pos = (seq_lens - q_lens)[:, None] + row  # absolute position of each query row
    first = None
    if sliding_window is not None:  # a request's rows see keys from q_pos[0] - window + 1 on: read only those blocks
        reach = -(-(sliding_window + max_q - 1) // bs) + 1
        if reach < nblk:
            nblk = reach
            first = torch.clamp_min(q_pos[:, 0] - sliding_window + 1, 0) // bs
    b = torch.arange(nblk, device=dev)
    logical = b[None, :] if first is None else first[:, None] + b[None, :]  # [R|1, nblk] logical block of each read
    used = logical * bs < seq_lens[:, None]  # a block past the sequence (or the table) reads block 0, all hidden
    ids = table[:, :nblk] if first is None else torch.gather(table, 1, torch.clamp_max(logical, width - 1))
    blocks = torch.where(used, ids.long(), 0).reshape(-1)
    s = nblk * bs
    pos = (logical[..., None] * bs + torch.arange(bs, device=dev)).view(-1, 1, s)  # [R|1, 1, S]
    hidden = pos > q_pos[..., None]  # causal; slots past the sequence are past every query too
    if sliding_window is not None:
        hidden |= pos <= q_pos[..., None] - sliding_window
    # the slots past a sequence hold whatever the cache has there (never written, another request's,
    # block 0): hidden, but their values must read as 0 so that a non-finite one cannot leak (0 * inf)
    past_end = (pos.view(-1, s) >= seq_lens[:, None]).view(-1)
    if _on_host(past_end):  # the rows to clear; elsewhere the mask (nonzero would wait on the device)
        past_end = past_end.nonzero().squeeze(1) if bool(past_end.any()) else None
    if starts is None:  # decodes: query r is token start + r, output row r
        return _Group(start, num_tokens, r, 1, s, None, blocks, hidden, past_end, None)
    t = torch.arange(start, start + num_tokens, device=dev)
    req = torch.searchsorted(starts[1:].contiguous(), t, right=True) if r > 1 else torch.zeros_like(t)
    return _Group(start, num_tokens, r, max_q, s, starts[:-1, None] + row, blocks, hidden, past_end,
                  (req, t - starts[req]))


def _plan(md: BatchMetadata, bs: int, sliding_window: int | None) -> tuple[_Group, ...]:
    """The step's groups for one cache block size and window: decodes, then prefills.

    Built from the metadata tensors and cached on ``md`` (like its registry check) while its
    ``query_start_loc``, ``seq_lens`` and ``block_table`` are the same tensors, unmodified, so the
    attention layers of a step share it. The index tensors live on the metadata's device."""
    tensors = (md.query_start_loc, md.seq_lens, md.block_table)
    try:
        stamp = (tuple(x._version for x in tensors), md.num_decodes, md.num_prefills, md.num_prefill_tokens)
    except RuntimeError:  # inference tensors have no version counter: nothing to cache on
        stamp = None
    key = (bs, sliding_window)
    cached = md.__dict__.get("_attention_plans")
    if (stamp is not None and cached is not None and cached[1] == stamp
            and all(a is b for a, b in zip(cached[0], tensors)) and key in cached[2]):
        return cached[2][key]
    qsl, seq, table = md.query_start_loc.long(), md.seq_lens.long(), md.block_table
    nd, npf = md.num_decodes, md.num_prefills
    groups = []
    if nd:
        ones = torch.ones(nd, dtype=torch.long, device=seq.device)
        groups.append(_group(0, nd, ones, seq[:nd], table[:nd], 1, bs, sliding_window))
    if npf:
        starts = qsl[nd:]
        q_lens = starts[1:] - starts[:-1]
        max_q = _host_max(q_lens, md.num_prefill_tokens - npf + 1)  # each prefill has >= 1 query token
        groups.append(_group(nd, md.num_prefill_tokens, q_lens, seq[nd:], table[nd:], max_q, bs, sliding_window,
                             starts))
    plan = tuple(groups)
    if stamp is not None:
        if cached is None or cached[1] != stamp or not all(a is b for a, b in zip(cached[0], tensors)):
            cached = (tensors, stamp, {})
            md.__dict__["_attention_plans"] = cached  # not a dataclass field: no effect on eq / repr / replace
        cached[2][key] = plan
    return plan


def _attend(query: torch.Tensor, kv_cache: torch.Tensor, grp: _Group, scale: float,
            logits_soft_cap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """One group's attention, ``[Hkv, R, G, Q, D]`` float32.

    The keys and values are gathered whole cache blocks at a time (``index_select`` on the block
    dimension: contiguous copies, whatever the cache's size) into ``[R, S, Hkv, D]``; each KV head
    is then one strided ``bmm`` over the requests against its ``G * Q`` query rows (query head
    ``kvh * G + g`` reads KV head ``kvh``: no repeat, no transposing copy; a 16-bit cache is widened
    to float32 one head at a time, a copy small enough to be read back from the CPU cache). Scaling,
    soft cap, masking and softmax run once over all heads."""
    hkv, d = kv_cache.shape[3:]
    r, nq, s = grp.num_reqs, grp.q_len, grp.kv_len
    g = query.shape[1] // hkv
    q = query[grp.start:grp.start + r] if grp.tokens is None else query[grp.tokens]
    q = q.reshape(r, nq, hkv, g, d).permute(2, 0, 3, 1, 4).reshape(hkv, r, g * nq, d).float()
    keys = kv_cache[0].index_select(0, grp.blocks).view(r, s, hkv, d)
    values = kv_cache[1].index_select(0, grp.blocks).view(r, s, hkv, d)  # a new tensor: ours to clear
    if grp.past_end is not None:
        if grp.past_end.dtype == torch.bool:
            values.view(r * s, hkv * d).masked_fill_(grp.past_end[:, None], 0.0)
        else:
            values.view(r * s, hkv, d).index_fill_(0, grp.past_end, 0.0)
    scores = q.new_empty((hkv, r, g * nq, s))
    for h in range(hkv):
        torch.bmm(q[h], keys[:, :, h].float().transpose(1, 2), out=scores[h])
    scores.mul_(scale)
    if logits_soft_cap is not None:
        scores.div_(logits_soft_cap).tanh_().mul_(logits_soft_cap)
    scores5 = scores.view(hkv, r, g, nq, s)
    scores5.masked_fill_(grp.hidden[None, :, None], float("-inf"))  # a query sees itself: no row is all -inf
    if sinks is None:
        probs = torch.softmax(scores, dim=-1)
    else:  # one extra logit per head in the denominator, with no value
        sink = sinks.to(device=scores.device, dtype=torch.float32).view(hkv, 1, g, 1, 1)
        m = torch.maximum(scores5.amax(dim=-1, keepdim=True), sink)
        e = scores5.sub_(m).exp_()
        probs = e.div_(e.sum(dim=-1, keepdim=True) + (sink - m).exp_()).view(hkv, r, g * nq, s)
    out = q.new_empty((hkv, r, g * nq, d))
    for h in range(hkv):
        torch.bmm(probs[h], values[:, :, h].float(), out=out[h])
    return out.view(hkv, r, g, nq, d)


def paged_attention_ref(query: torch.Tensor, kv_cache: torch.Tensor, md: BatchMetadata, scale: float, *,
                        sliding_window: int | None = None, logits_soft_cap: float | None = None,
                        sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each request's queries over its whole cached history, with the optional
    features of the module docstring; returns float32 ``[num_tokens, Hq, D]``.

    Batched over requests, no loop over them: the decode-first batch is at most two groups, the
    decodes (one query row each) and the prefills (query rows padded to the longest); each is one
    gather of its requests' cache blocks and one masked batched computation (``_attend``: a ``bmm``
    per KV head, the rest over all heads at once) in float32. The gather's index tensors and the masks come from the metadata tensors, once per step
    (``_plan``); padded lengths are read on the host only from CPU tensors (elsewhere bounds the
    host knows: no device sync)."""
    _, _, bs, hkv, d = kv_cache.shape
    num_tokens, hq, _ = query.shape
    out = query.new_zeros((num_tokens, hq, d), dtype=torch.float32)
    if num_tokens == 0:
        return out
    for grp in _plan(md, bs, sliding_window):
        o = _attend(query, kv_cache, grp, scale, logits_soft_cap, sinks)  # [Hkv, R, G, Q, D]
        dst = out[grp.start:grp.start + grp.num_tokens]
        if grp.rows is None:
            dst.view(grp.num_reqs, hkv, hq // hkv, d).copy_(o.squeeze(3).permute(1, 0, 2, 3))
        else:
            dst.copy_(o[:, grp.rows[0], :, grp.rows[1]].reshape(grp.num_tokens, hq, d))
    return out


def check_attention_args(query, key, value, output, output_scale, layer=None) -> None:
    """Argument checks of one attention call; with the ``layer`` (when known), its KV cache too.
    Run by the entry point in eager and the fake kernel at trace time, never by the kernels."""
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
        _quant._check_scale(output_scale)
    t, hq, d = query.shape
    if sizes_differ(key.shape, value.shape) or sizes_differ(key.shape[0], t) or sizes_differ(key.shape[2], d):
        raise ValueError(f"attention: key {tuple(key.shape)} / value {tuple(value.shape)} do not match query {tuple(query.shape)}")
    if sizes_differ(hq % key.shape[1], 0):
        raise ValueError(f"attention: {hq} query heads are not a multiple of {key.shape[1]} KV heads")
    if sizes_differ(output.shape, query.shape):
        raise ValueError(f"attention: output {tuple(output.shape)} must have the query's shape {tuple(query.shape)}")
    if (output_scale is None) == (output.dtype == FP8_DTYPE):
        raise ValueError(
            f"attention: output dtype {output.dtype} requires "
            + ("an output_scale" if output.dtype == FP8_DTYPE else "output_scale=None (or an fp8 output)")
        )
    if layer is None:
        return
    cache = getattr(layer, "kv_cache", None)
    if cache is None or sizes_differ(cache.shape[3:], key.shape[1:]):
        raise ValueError(
            f"attention: layer {getattr(layer, 'prefix', layer)!r} has no KV cache of shape "
            f"[2, blocks, block_size, {key.shape[1]}, {d}]"
        )


def resolve_attention(query, key, value, output, layer_name, output_scale):
    """The layer and batch metadata of one attention call (shared by the CPU op and the Triton
    kernel). No argument checks (``check_attention_args``: the entry point and the fake kernel run
    them); only that this step's metadata has the call's token count, which changes every step."""
    layer = lookup_layer(layer_name, ("kv_cache", "scale"), "unified_attention_with_output")
    md = get_batch_metadata()
    if md.slot_mapping.shape[0] != query.shape[0]:
        raise ValueError(
            f"attention: {query.shape[0]} query tokens but the batch metadata has "
            f"{md.slot_mapping.shape[0]} (slot_mapping); the step's tokens must match its metadata"
        )
    return layer, md


def _attn_fake(query, key, value, output, layer_name, output_scale=None) -> None:
    check_attention_args(query, key, value, output, output_scale, find_layer(layer_name))
    return None


@layerpass_op("unified_attention_with_output", mutates_args=("output",), fake=_attn_fake, splits=True)
def _unified_attention_with_output_kernel(
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


def unified_attention_with_output(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    output: torch.Tensor,
    layer_name: LayerNameType,
    output_scale: torch.Tensor | None = None,
) -> None:
    """``torch.ops.layerpass.unified_attention_with_output`` after its argument checks (in eager;
    under ``torch.compile`` the fake kernel runs them at trace time): what layers call."""
    if not torch.compiler.is_compiling():
        check_attention_args(query, key, value, output, output_scale, find_layer(layer_name))
    if output_scale is None:
        torch.ops.layerpass.unified_attention_with_output(query, key, value, output, layer_name)
    else:
        torch.ops.layerpass.unified_attention_with_output(query, key, value, output, layer_name, output_scale)
