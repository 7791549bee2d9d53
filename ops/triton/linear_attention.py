"""Triton kernels for ``layerpass::linear_attention``: the decode recurrence and the chunked prefill.

Same math and same decode-first indexing as the CPU reference in ``ops/linear_attention.py``:
decode request ``i`` reads query row ``i`` and state slot ``state_indices[i]``; prefill request
``r`` reads rows ``query_start_loc[nd + r] : query_start_loc[nd + r + 1]`` and slot
``state_indices[nd + r]``. The state is accumulated in float32 and stored in the cache dtype.

One program per (request, head, block of value columns): the state tile ``[Dk, BV]`` lives in
registers for the whole request, so each slot is read once and written once.
On CPU run them under ``TRITON_INTERPRET=1`` (set before this module is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..forward_context import get_batch_metadata
from ..layer_lookup import lookup_layer
from ..layer_name import LayerNameType
from ..linear_attention import OP_NAME, check_step_metadata

MIN_DOT = 16  # tl.dot needs every dimension >= 16 when compiled
DEFAULT_TRITON_BLOCK = 64


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, state_ptr, slopes_ptr, slots_ptr, init_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_sn, stride_sh, stride_sk, stride_sv,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    vb = tl.program_id(2)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    init = tl.load(init_ptr + t)
    decay = tl.exp(-tl.load(slopes_ptr + h).to(tl.float32))
    offs_k = tl.arange(0, BK)
    offs_v = vb * BV + tl.arange(0, BV)
    mk = offs_k < DK
    mv = offs_v < DV
    q = tl.load(q_ptr + t * stride_qt + h * stride_qh + offs_k, mask=mk, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + offs_k, mask=mk, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + offs_v, mask=mv, other=0.0).to(tl.float32)
    s_ptrs = state_ptr + slot * stride_sn + h * stride_sh + offs_k[:, None] * stride_sk + offs_v[None, :] * stride_sv
    smask = mk[:, None] & mv[None, :]
    state = tl.load(s_ptrs, mask=smask, other=0.0).to(tl.float32)
    state = tl.where(init != 0, state, 0.0)
    state = decay * state + k[:, None] * v[None, :]
    # tl.reduce with a local combine fn, not tl.sum: triton.language's own @jit helpers are built
    # when triton is imported, so they cannot be interpreted if triton came in before TRITON_INTERPRET
    o = tl.reduce(q[:, None] * state, 0, _add)
    tl.store(s_ptrs, state.to(state_ptr.dtype.element_ty), mask=smask)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + offs_v, o.to(out_ptr.dtype.element_ty), mask=mv)


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, state_ptr, slopes_ptr, slots_ptr, init_ptr, qsl_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_sn, stride_sh, stride_sk, stride_sv,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BLOCK: tl.constexpr,
):
    r = tl.program_id(0)
    h = tl.program_id(1)
    vb = tl.program_id(2)
    start = tl.load(qsl_ptr + r).to(tl.int64)
    end = tl.load(qsl_ptr + r + 1).to(tl.int64)
    slot = tl.load(slots_ptr + r).to(tl.int64)
    init = tl.load(init_ptr + r)
    s = tl.load(slopes_ptr + h).to(tl.float32)
    offs_k = tl.arange(0, BK)
    offs_v = vb * BV + tl.arange(0, BV)
    offs_b = tl.arange(0, BLOCK)
    mk = offs_k < DK
    mv = offs_v < DV
    s_ptrs = state_ptr + slot * stride_sn + h * stride_sh + offs_k[:, None] * stride_sk + offs_v[None, :] * stride_sv
    smask = mk[:, None] & mv[None, :]
    state = tl.load(s_ptrs, mask=smask, other=0.0).to(tl.float32)
    state = tl.where(init != 0, state, 0.0)
    diff = (offs_b[:, None] - offs_b[None, :]).to(tl.float32)
    intra = tl.where(diff >= 0, tl.exp(-s * tl.maximum(diff, 0.0)), 0.0)  # lambda^(i-j), causal
    q_decay = tl.exp(-s * (offs_b + 1).to(tl.float32))  # lambda^(i+1): how far the carried state decays
    for blk in range(start, end, BLOCK):
        rows = blk + offs_b
        mrow = rows < end
        qb = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_k[None, :],
                     mask=mrow[:, None] & mk[None, :], other=0.0).to(tl.float32)
        kb = tl.load(k_ptr + rows[:, None] * stride_kt + h * stride_kh + offs_k[None, :],
                     mask=mrow[:, None] & mk[None, :], other=0.0).to(tl.float32)
        vblk = tl.load(v_ptr + rows[:, None] * stride_vt + h * stride_vh + offs_v[None, :],
                       mask=mrow[:, None] & mv[None, :], other=0.0).to(tl.float32)
        scores = tl.dot(qb, tl.trans(kb), input_precision="ieee") * intra
        o = tl.dot(scores, vblk, input_precision="ieee")
        o += tl.dot(qb * q_decay[:, None], state, input_precision="ieee")
        tl.store(out_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_v[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=mrow[:, None] & mv[None, :])
        n = tl.minimum(end - blk, BLOCK).to(tl.float32)  # real tokens in this block
        expo = n - 1.0 - offs_b.to(tl.float32)
        k_decay = tl.where(expo >= 0, tl.exp(-s * tl.maximum(expo, 0.0)), 0.0)
        state = tl.exp(-s * n) * state + tl.dot(tl.trans(kb * k_decay[:, None]), vblk, input_precision="ieee")
    tl.store(s_ptrs, state.to(state_ptr.dtype.element_ty), mask=smask)


def _tiles(dk: int, dv: int) -> tuple[int, int, int]:
    bk = max(MIN_DOT, triton.next_power_of_2(dk))
    bv = min(max(MIN_DOT, triton.next_power_of_2(dv)), 64)
    return bk, bv, triton.cdiv(dv, bv)


def _check_inner_stride(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            raise ValueError(f"linear_attention (triton): {name} needs a contiguous last dimension, got strides {t.stride()}")


def linear_attention_decode_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    output: torch.Tensor,
    state_cache: torch.Tensor,
    slopes: torch.Tensor,
    slots: torch.Tensor,
    has_initial_state: torch.Tensor,
) -> None:
    """One recurrence step for the ``N = query.shape[0]`` decode tokens (row ``i`` uses slot ``slots[i]``)."""
    n, h, dk = query.shape
    dv = value.shape[2]
    if n == 0:
        return
    _check_inner_stride(query=query, key=key, value=value, output=output, state_cache=state_cache)
    bk, bv, nvb = _tiles(dk, dv)
    _decode_kernel[(n, h, nvb)](
        query, key, value, output, state_cache, slopes, slots, has_initial_state.to(torch.int32),
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        output.stride(0), output.stride(1), *state_cache.stride(),
        DK=dk, DV=dv, BK=bk, BV=bv,
    )


def linear_attention_prefill_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    output: torch.Tensor,
    state_cache: torch.Tensor,
    slopes: torch.Tensor,
    query_start_loc: torch.Tensor,
    slots: torch.Tensor,
    has_initial_state: torch.Tensor,
    block: int = DEFAULT_TRITON_BLOCK,
) -> None:
    """Chunked prefill: request ``r`` owns rows ``query_start_loc[r]:query_start_loc[r+1]`` (absolute
    rows of ``query``) and slot ``slots[r]``. ``block`` is the chunk length (a power of two >= 16)."""
    num_reqs = slots.shape[0]
    h, dk, dv = query.shape[1], query.shape[2], value.shape[2]
    if num_reqs == 0:
        return
    if block < MIN_DOT or block & (block - 1):
        raise ValueError(f"linear_attention (triton): block must be a power of two >= {MIN_DOT}, got {block}")
    _check_inner_stride(query=query, key=key, value=value, output=output, state_cache=state_cache)
    bk, bv, nvb = _tiles(dk, dv)
    _prefill_kernel[(num_reqs, h, nvb)](
        query, key, value, output, state_cache, slopes, slots, has_initial_state.to(torch.int32),
        query_start_loc.to(torch.int32),
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        output.stride(0), output.stride(1), *state_cache.stride(),
        DK=dk, DV=dv, BK=bk, BV=bv, BLOCK=block,
    )


def linear_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    output: torch.Tensor,
    layer_name: LayerNameType,
) -> None:
    """The op's CUDA kernel: same signature and semantics as ``layerpass::linear_attention``. No
    argument checks (the entry point and the fake kernel run them); the step's metadata is checked
    against the call (``check_step_metadata``: counts and shapes, no device read)."""
    layer = lookup_layer(layer_name, ("state_cache",), OP_NAME)
    md = get_batch_metadata()
    check_step_metadata(query, md, where="linear_attention (triton)")
    state_cache, slopes = layer.state_cache, layer.slopes
    nd = md.num_decodes
    slots, init = md.state_indices, md.has_initial_state
    slopes = slopes.to(device=query.device, dtype=torch.float32).contiguous()  # a no-op when already there
    linear_attention_decode_triton(
        query[:nd], key[:nd], value[:nd], output[:nd], state_cache, slopes, slots[:nd], init[:nd]
    )
    linear_attention_prefill_triton(
        query, key, value, output, state_cache, slopes, md.query_start_loc[nd:], slots[nd:], init[nd:]
    )
