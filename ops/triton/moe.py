"""Triton MoE: token-to-expert sort/align and a grouped GEMM over experts, for ``moe_forward(_shared)``.

- ``moe_align_block_size``: the ``T * top_k`` (token, expert) pairs sorted by expert (stable:
  pair order within an expert is kept), each expert's run padded to a multiple of the GEMM's
  ``BLOCK_M`` with the sentinel ``T * top_k``; plus the expert of every block and the padded
  total. One program: per chunk of pairs a one-hot ``[chunk, experts]`` cumulative sum ranks
  each pair within its expert, with no atomics, so the order is deterministic.
- ``_grouped_gemm_kernel``: one program per (block of sorted pairs, tile of output columns);
  the block's rows all belong to one expert, so it is a dense ``[BLOCK_M, K] @ [K, BLOCK_N]``
  against that expert's weight, rows gathered through the sorted ids; optionally scaled by the
  pair's top-k weight. Padding rows are masked.

``fused_experts_triton`` chains them like the CPU reference: gate/up GEMM, SiLU-and-mul (the
Triton activation kernel), down GEMM weighted by the router, sum over each token's top-k.
Intermediates are kept in the activation dtype (as GPU MoE kernels do; the reference keeps
float32), and the weighted down projection in float32 until the final sum.
Routing itself (softmax + top-k) stays ``ops.moe.select_experts``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layer_lookup import lookup_layer
from ..layer_name import LayerNameType
from ..moe import MOE_LAYER_ATTRS, select_experts, shared_experts_of
from ._common import DOT_UPCAST, cast_rne, cumsum, dot_block, dot_f32acc, dot_mode, reduce_sum
from .activation import silu_and_mul_launch

ALIGN_CHUNK = 64


@triton.jit
def _moe_align_kernel(
    topk_ids_ptr, sorted_ids_ptr, expert_ids_ptr, total_ptr, rank_ptr,
    numel, max_blocks,
    BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr,
):
    experts = tl.arange(0, E_PAD)
    counts = tl.full([E_PAD], 0, dtype=tl.int32)
    # pass 1: rank of each pair among the earlier pairs routed to the same expert
    for start in range(0, numel, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        valid = offs < numel
        ids = tl.load(topk_ids_ptr + offs, mask=valid, other=-1).to(tl.int32)
        onehot = (ids[:, None] == experts[None, :]).to(tl.int32)  # padding rows match no expert
        earlier = cumsum(onehot, 0) - onehot
        tl.store(rank_ptr + offs, reduce_sum(onehot * (earlier + counts[None, :]), 1), mask=valid)
        counts += reduce_sum(onehot, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = cumsum(padded, 0)
    starts = ends - padded
    total = reduce_sum(padded, 0)
    tl.store(total_ptr, total)
    # pass 2: scatter each pair id to its expert's segment
    for start in range(0, numel, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        valid = offs < numel
        ids = tl.load(topk_ids_ptr + offs, mask=valid, other=-1).to(tl.int32)
        onehot = (ids[:, None] == experts[None, :]).to(tl.int32)
        pos = reduce_sum(onehot * starts[None, :], 1) + tl.load(rank_ptr + offs, mask=valid, other=0)
        tl.store(sorted_ids_ptr + pos, offs, mask=valid)
    # the expert of a block = how many (padded) expert segments end at or before its first row
    for start in range(0, max_blocks, CHUNK):
        blocks = start + tl.arange(0, CHUNK)
        first_row = blocks * BLOCK_M
        expert = reduce_sum((ends[None, :] <= first_row[:, None]).to(tl.int32), 1)
        expert = tl.where(first_row < total, expert, -1)
        tl.store(expert_ids_ptr + blocks, expert, mask=blocks < max_blocks)


def moe_align_block_size(
    topk_ids: torch.Tensor, block_m: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sorted_ids, expert_ids, num_tokens_post_padded)`` for ``topk_ids [T, k]``.

    ``sorted_ids [max_padded]``: pair ids ``t * k + j`` grouped by expert, each group padded to
    a multiple of ``block_m`` with ``T * k``; ``expert_ids [max_padded // block_m]``: expert of
    each block (-1 past the end); ``num_tokens_post_padded [1]``: the padded length (on device:
    sizes are worst-case bounds, so nothing syncs with the host)."""
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"moe_align_block_size: block_m must be a power of two, got {block_m}")
    if topk_ids.dim() != 2:
        raise ValueError(f"moe_align_block_size: topk_ids must be [tokens, top_k], got shape {tuple(topk_ids.shape)}")
    numel = topk_ids.numel()
    device = topk_ids.device
    max_padded = numel + min(num_experts, numel) * (block_m - 1)
    max_blocks = triton.cdiv(max_padded, block_m)
    sorted_ids = torch.full((max_blocks * block_m,), numel, dtype=torch.int32, device=device)
    expert_ids = torch.empty((max_blocks,), dtype=torch.int32, device=device)
    total = torch.zeros((1,), dtype=torch.int32, device=device)
    if numel:
        rank = torch.empty((numel,), dtype=torch.int32, device=device)
        _moe_align_kernel[(1,)](
            topk_ids.contiguous(), sorted_ids, expert_ids, total, rank, numel, max_blocks,
            BLOCK_M=block_m, E_PAD=triton.next_power_of_2(num_experts), CHUNK=ALIGN_CHUNK,
        )
    return sorted_ids, expert_ids, total


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, w_ptr, c_ptr, sorted_ids_ptr, expert_ids_ptr, total_ptr, topk_w_ptr,
    N, K, numel, a_row_div,
    stride_am, stride_we, stride_wn, stride_wk, stride_cm,
    MUL_WEIGHT: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M < tl.load(total_ptr):  # blocks past the padded total do nothing
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)
        row_valid = pair < numel
        a_row = pair // a_row_div  # pair t*k+j reads token t (first GEMM) or row t*k+j (second)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_valid = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)
        w_base = w_ptr + expert * stride_we
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            k_valid = kk < K
            a = tl.load(a_ptr + a_row[:, None] * stride_am + kk[None, :], mask=row_valid[:, None] & k_valid[None, :], other=0.0)
            b = tl.load(
                w_base + offs_n[None, :] * stride_wn + kk[:, None] * stride_wk,
                mask=k_valid[:, None] & n_valid[None, :], other=0.0,
            )
            acc += dot_f32acc(a, b, DOT)
        if MUL_WEIGHT:
            acc = acc * tl.load(topk_w_ptr + pair, mask=row_valid, other=0.0).to(tl.float32)[:, None]
        c_ptrs = c_ptr + pair[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, cast_rne(acc, c_ptr.dtype.element_ty), mask=row_valid[:, None] & n_valid[None, :])


def grouped_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    sorted_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    total: torch.Tensor,
    numel: int,
    a_row_div: int,
    block_m: int,
    out_dtype: torch.dtype,
    topk_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``c[p] = a[p // a_row_div] @ w[expert(p)].T (* topk_weights[p])`` for each sorted pair ``p``."""
    num_experts, n, k = w.shape
    if a.stride(-1) != 1:
        a = a.contiguous()
    c = torch.empty((numel, n), dtype=out_dtype, device=a.device)
    if numel == 0 or n == 0:
        return c
    mode = dot_mode(a.dtype, a.device) if a.dtype == w.dtype else DOT_UPCAST  # mixed dtypes: exact fp32
    block_n, block_k = min(dot_block(n), 64), min(dot_block(k), 64)
    grid = (expert_ids.shape[0], triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](
        a, w, c, sorted_ids, expert_ids, total, topk_weights if topk_weights is not None else a,
        n, k, numel, a_row_div,
        a.stride(0), w.stride(0), w.stride(1), w.stride(2), c.stride(0),
        MUL_WEIGHT=topk_weights is not None, DOT=mode, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return c


def default_block_m(numel: int) -> int:
    """Rows per expert block: 16 (the ``tl.dot`` minimum, little padding) for decode-sized batches."""
    return 16 if numel <= 1024 else 64


def fused_experts_triton(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    block_m: int | None = None,
) -> torch.Tensor:
    """Same contract as ``ops.moe.fused_experts_ref``: ``sum_j w_j * expert_{id_j}(x)`` per token."""
    num_tokens, hidden = x.shape
    num_experts = w13.shape[0]
    top_k = topk_ids.shape[1]
    numel = num_tokens * top_k
    block_m = block_m or default_block_m(numel)
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"fused_experts_triton: block_m must be a power of two >= 16 (a tl.dot tile), got {block_m}")
    sorted_ids, expert_ids, total = moe_align_block_size(topk_ids, block_m, num_experts)
    h = grouped_gemm(x, w13, sorted_ids, expert_ids, total, numel, top_k, block_m, x.dtype)
    act = silu_and_mul_launch(h)
    flat_w = topk_weights.reshape(-1).to(torch.float32)
    y = grouped_gemm(act, w2, sorted_ids, expert_ids, total, numel, 1, block_m, torch.float32, flat_w)
    return y.view(num_tokens, top_k, hidden).sum(dim=1).to(x.dtype)


def _routed(hidden_states: torch.Tensor, router_logits: torch.Tensor, layer) -> torch.Tensor:
    weights, ids = select_experts(router_logits, layer.top_k, layer.renormalize)
    return fused_experts_triton(hidden_states, layer.w13_weight, layer.w2_weight, weights, ids)


def moe_forward(hidden_states: torch.Tensor, router_logits: torch.Tensor, layer_name: LayerNameType) -> torch.Tensor:
    """CUDA kernel of ``layerpass::moe_forward`` (no argument checks: see ``ops/norm.py``'s docstring)."""
    return _routed(hidden_states, router_logits, lookup_layer(layer_name, MOE_LAYER_ATTRS, "moe_forward"))


def moe_forward_shared(
    hidden_states: torch.Tensor, router_logits: torch.Tensor, layer_name: LayerNameType
) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA kernel of ``layerpass::moe_forward_shared``: routed experts here, shared experts as the layer's module."""
    layer = lookup_layer(layer_name, MOE_LAYER_ATTRS, "moe_forward_shared")
    shared = shared_experts_of(layer)
    return _routed(hidden_states, router_logits, layer), shared(hidden_states)
