"""Triton paged attention behind ``unified_attention_with_output`` (decode + prefill, GQA, FP8 out).

Two kernels:

- ``_kv_write_kernel``: one program per new token stores its keys and values at
  ``slot_mapping[t] = block * block_size + offset`` of the layer's
  ``kv_cache [2, num_blocks, block_size, num_kv_heads, head_size]``.
- ``_paged_attention_kernel``: one program per (query block, query head). Query blocks
  are laid out per request without a host sync: request ``r`` owns the program ids from
  ``query_start_loc[r] // BLOCK_M + r`` on (enough for ``ceil(q_len / BLOCK_M)`` blocks),
  so the grid is ``num_tokens // BLOCK_M + num_reqs`` and a program finds its request by a
  binary search over ``query_start_loc``. Decodes (one query each) and prefills share the
  launch. Keys are walked in tiles of ``BLOCK_N`` positions through the block table (any
  cache block size), with an online softmax in float32, up to the block's last causal
  position. With ``output_scale`` the result is rounded to the query dtype (the unfused
  attention's output) and quantised to FP8 in the epilogue.

The layer's features (see ``ops/attention.py``) are compile-time switches of the kernel, their
values runtime arguments: a sliding window also starts the key walk at the block's first
visible position (``q_pos - window + 1``), so a long history costs only the window; the soft cap
``cap * tanh(s / cap)`` is applied to the scaled scores before masking (``tanh`` written with
``exp``, which both the GPU and the interpreter have); sinks seed the online softmax with
``m = sink, l = exp(sink - m) = 1`` and no value, which is exactly one extra logit in the
denominator.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..attention import AttentionFeatures, attention_features, resolve_attention, write_kv_cache
from ..batch_metadata import BatchMetadata
from ..layer_name import LayerNameType
from ._common import (
    as_fp8_bytes, cast_rne, dot_block, dot_f32acc, dot_mode, quantize_fp8_value, reduce_max, reduce_sum, scale_as_f32,
)

_KERNEL_CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _kv_write_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    block_size, num_kv_heads,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    HEAD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:  # a negative slot marks a padding token: nothing to store
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h[:, None] < num_kv_heads) & (offs_d[None, :] < HEAD)
        dst = (slot // block_size) * stride_cb + (slot % block_size) * stride_cs
        dst = dst + offs_h[:, None] * stride_ch + offs_d[None, :]
        k = tl.load(key_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask, other=0.0)
        v = tl.load(value_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask, other=0.0)
        tl.store(k_cache_ptr + dst, cast_rne(k.to(tl.float32), k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, cast_rne(v.to(tl.float32), v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _find_request(qsl_ptr, num_reqs, qb, BLOCK_M: tl.constexpr):
    """The largest request ``r`` whose first query block id ``qsl[r] // BLOCK_M + r`` is <= ``qb``."""
    lo = 0
    hi = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(qsl_ptr + mid) // BLOCK_M + mid <= qb:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, out_scale_ptr,
    block_table_ptr, seq_lens_ptr, qsl_ptr,
    num_reqs, sm_scale, block_size, window, soft_cap, sinks_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    GROUP: tl.constexpr, HEAD: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    QUANT: tl.constexpr, DOT: tl.constexpr,
    SLIDING: tl.constexpr, SOFTCAP: tl.constexpr, SINKS: tl.constexpr,
):
    qb = tl.program_id(0)
    head = tl.program_id(1)
    req = _find_request(qsl_ptr, num_reqs, qb, BLOCK_M)
    q_start = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_start
    local = qb - (q_start // BLOCK_M + req)
    if local * BLOCK_M < q_len:  # spare program ids of a request (see the module docstring) do nothing
        seq_len = tl.load(seq_lens_ptr + req)
        context = seq_len - q_len
        offs_m = local * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < q_len
        d_valid = offs_d < HEAD
        q_pos = context + offs_m  # absolute position of each query row
        tok = (q_start + offs_m).to(tl.int64)
        q = tl.load(
            q_ptr + tok[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
            mask=m_valid[:, None] & d_valid[None, :], other=0.0,
        )
        kv_head = head // GROUP
        # finite start: fully masked rows (padding) then give exp(-inf - m) = 0, never NaN
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
        if SINKS:  # the sink is the first logit seen: m = max(sink, -1e30), l = exp(sink - m), no value
            sink = tl.load(sinks_ptr + head).to(tl.float32)
            m_i = tl.maximum(m_i, sink)
            l_i = tl.exp(sink - m_i)
        acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
        kv_end = tl.minimum(seq_len, context + tl.minimum(q_len, (local + 1) * BLOCK_M))  # causal bound
        kv_start = 0
        if SLIDING:  # nothing before the first row's window is visible to any row of the block
            kv_start = tl.maximum(context + local * BLOCK_M - window + 1, 0)
        bt_row = block_table_ptr + req.to(tl.int64) * stride_bt
        for start in range(kv_start, kv_end, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_valid = offs_n < kv_end
            blk = tl.load(bt_row + offs_n // block_size, mask=n_valid, other=0).to(tl.int64)
            base = blk * stride_cb + (offs_n % block_size) * stride_cs + kv_head * stride_ch
            kv_mask = n_valid[:, None] & d_valid[None, :]
            k = tl.load(k_cache_ptr + base[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
            s = dot_f32acc(q, tl.trans(k), DOT) * sm_scale
            if SOFTCAP:  # cap * tanh(s / cap), tanh(x) = 1 - 2 / (exp(2x) + 1) (saturates to +-1, no NaN)
                s = soft_cap * (1.0 - 2.0 / (tl.exp(s * (2.0 / soft_cap)) + 1.0))
            causal = m_valid[:, None] & n_valid[None, :] & (offs_n[None, :] <= q_pos[:, None])
            if SLIDING:  # keys in (q_pos - window, q_pos]
                causal = causal & (offs_n[None, :] > q_pos[:, None] - window)
            s = tl.where(causal, s, float("-inf"))
            m_new = tl.maximum(m_i, reduce_max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + reduce_sum(p, 1)
            v = tl.load(v_cache_ptr + base[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
            # P enters the second dot in the model dtype (no-op for float32), as flash attention does
            acc = acc * alpha[:, None] + dot_f32acc(cast_rne(p, v.dtype), v, DOT)
            m_i = m_new
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        o_ptrs = out_ptr + tok[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
        o_mask = m_valid[:, None] & d_valid[None, :]
        if QUANT:  # the unfused chain: attention output in the query dtype, then static FP8 quant
            y = quantize_fp8_value(cast_rne(out, q_ptr.dtype.element_ty).to(tl.float32), tl.load(out_scale_ptr))
            tl.store(o_ptrs, y, mask=o_mask)  # fp8 bytes (out is a uint8 view)
        else:
            tl.store(o_ptrs, cast_rne(out, out_ptr.dtype.element_ty), mask=o_mask)


def write_kv_cache_triton(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store this step's keys/values at their slots (as ``ops.attention.write_kv_cache``)."""
    num_tokens, hkv, d = key.shape
    if kv_cache.dtype not in _KERNEL_CACHE_DTYPES or kv_cache.stride(-1) != 1:
        write_kv_cache(kv_cache, key, value, slot_mapping)  # e.g. an fp8 cache: keep torch's cast
        return
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    if num_tokens == 0:
        return
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _kv_write_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        kv_cache.shape[2], hkv,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        HEAD=d, BLOCK_H=triton.next_power_of_2(hkv), BLOCK_D=triton.next_power_of_2(d),
    )


def default_block_m(md: BatchMetadata) -> int:
    """Query rows per program: 16 (the ``tl.dot`` minimum) for decode-only batches, else 32."""
    return 16 if md.num_prefills == 0 else 32


def paged_attention_triton(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    md: BatchMetadata,
    scale: float,
    output: torch.Tensor,
    output_scale: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int = 32,
    *,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> None:
    """Causal GQA attention of each request's queries over its cached history, into ``output``,
    with the optional features of ``ops/attention.py`` (``sinks``: float ``[Hq]``)."""
    num_tokens, hq, d = query.shape
    _, _, block_size, hkv, _ = kv_cache.shape
    if num_tokens == 0 or md.num_reqs == 0:
        return
    block_m = block_m or default_block_m(md)
    for name, b in (("block_m", block_m), ("block_n", block_n)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"paged attention: {name} must be a power of two >= 16, got {b}")
    if query.stride(-1) != 1:
        query = query.contiguous()
    target = output if output.stride(-1) == 1 else torch.empty(output.shape, dtype=output.dtype, device=output.device)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    if k_cache.stride(-1) != 1:
        raise ValueError(f"paged attention: the KV cache's head_size dimension must be contiguous, strides {kv_cache.stride()}")
    qsl = md.query_start_loc.to(torch.int32)
    if sinks is not None:
        if tuple(sinks.shape) != (hq,):
            raise ValueError(f"paged attention: sinks must have shape [{hq}] (one per query head), got {tuple(sinks.shape)}")
        sinks = sinks.detach().to(device=query.device, dtype=torch.float32).contiguous()
    grid = (num_tokens // block_m + md.num_reqs, hq)
    _paged_attention_kernel[grid](
        query, k_cache, v_cache, as_fp8_bytes(target),
        scale_as_f32(output_scale) if output_scale is not None else query,
        md.block_table, md.seq_lens, qsl,
        md.num_reqs, float(scale), block_size,
        int(sliding_window or 0), float(logits_soft_cap or 0.0), sinks if sinks is not None else query,
        query.stride(0), query.stride(1), target.stride(0), target.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), md.block_table.stride(0),
        GROUP=hq // hkv, HEAD=d, BLOCK_D=dot_block(d), BLOCK_M=block_m, BLOCK_N=block_n,
        QUANT=output_scale is not None, DOT=dot_mode(query.dtype, query.device),
        SLIDING=sliding_window is not None, SOFTCAP=logits_soft_cap is not None, SINKS=sinks is not None,
    )
    if target is not output:
        output.copy_(target)


def unified_attention_with_output(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    output: torch.Tensor,
    layer_name: LayerNameType,
    output_scale: torch.Tensor | None = None,
) -> None:
    """CUDA kernel of ``layerpass::unified_attention_with_output``: same contract as the CPU op."""
    layer, md = resolve_attention(query, key, value, output, layer_name, output_scale)
    feats: AttentionFeatures = attention_features(layer, query)
    write_kv_cache_triton(layer.kv_cache, key, value, md.slot_mapping)
    paged_attention_triton(query, layer.kv_cache, md, feats.scale, output, output_scale,
                           sliding_window=feats.sliding_window, logits_soft_cap=feats.logits_soft_cap, sinks=feats.sinks)
