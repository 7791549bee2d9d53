"""``linear_attention``: lightning-style linear attention with per-head decay and recurrent state.

For one sequence and one head with decay slope ``s`` (``lambda = exp(-s)``) the op computes

    S_t = lambda * S_{t-1} + k_t^T v_t        (S: [Dk, Dv], the recurrent state)
    o_t = q_t S_t

i.e. ``o_i = sum_{j<=i} lambda^(i-j) (q_i . k_j) v_j + lambda^(i+1) q_i S_0``.

The layer (resolved by name) owns ``state_cache [num_state_slots, H, Dk, Dv]`` (any float
dtype; the math runs in float32 and the result is stored back in the cache dtype), ``slopes``
(``[H]``) and optionally ``block_size`` (the prefill chunk length).

Batches are decode-first (see ``forward_context``): the ``num_decodes`` decode requests own
query rows ``[0, num_decode_tokens)`` and state slots ``state_indices[:num_decodes]``; the
prefills follow in both. Every request starts from its slot's state when
``has_initial_state`` says the slot holds one, else from zeros. Decodes use the single-step
recurrence; prefills use the chunked (block) form: inside a block the quadratic masked form,
across blocks the state carries the past — O(L * B) instead of O(L^2). On CUDA the op runs the
Triton kernels of ``ops/triton/linear_attention.py`` (registered with the others, ``ops/triton``).
"""

from __future__ import annotations

import torch

from .batch_metadata import BatchMetadata
from .forward_context import get_batch_metadata
from .layer_lookup import find_layer, lookup_layer
from .layer_name import LayerNameType
from .library import layerpass_op, sizes_differ

OP_NAME = "linear_attention"
DEFAULT_BLOCK_SIZE = 64
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------- validation
def check_linear_attention_args(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    output: torch.Tensor,
    layer: object = None,
    where: str = OP_NAME,
) -> None:
    """Argument checks of one call; with the ``layer`` (when known), its ``state_cache`` and
    ``slopes`` too. Run by the entry point in eager and the fake kernel at trace time, never by the
    kernels (CPU or Triton)."""
    if (query.dim() != 3 or sizes_differ(key.shape, query.shape) or value.dim() != 3
            or sizes_differ(value.shape[:2], query.shape[:2])):
        raise ValueError(
            f"{where}: expected query/key [T, H, Dk] and value [T, H, Dv]; got query {tuple(query.shape)}, "
            f"key {tuple(key.shape)}, value {tuple(value.shape)}"
        )
    if sizes_differ(output.shape, value.shape):
        raise ValueError(f"{where}: output {tuple(output.shape)} must have the value's shape {tuple(value.shape)}")
    for name, t in (("query", query), ("key", key), ("value", value), ("output", output)):
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{where}: {name} must be a float tensor ({_FLOAT_DTYPES}), got {t.dtype}")
    if layer is None:
        return
    state_cache = getattr(layer, "state_cache", None)
    slopes = getattr(layer, "slopes", None)
    _, h, dk = query.shape
    dv = value.shape[2]
    if state_cache is None or state_cache.dim() != 4 or sizes_differ(state_cache.shape[1:], (h, dk, dv)):
        got = None if state_cache is None else tuple(state_cache.shape)
        raise ValueError(
            f"{where}: the layer needs a state_cache of shape [num_state_slots, {h}, {dk}, {dv}], got {got}"
        )
    if state_cache.device != query.device:
        raise ValueError(
            f"{where}: the layer's state_cache is on {state_cache.device} but query is on {query.device}; "
            f"move it with the model (it is a plain attribute, which Module.to does not move)"
        )
    if state_cache.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{where}: state_cache must be a float tensor ({_FLOAT_DTYPES}), got {state_cache.dtype}")
    if slopes is None or sizes_differ(slopes.shape, (h,)):
        raise ValueError(
            f"{where}: the layer needs per-head decay slopes of shape [{h}], got "
            f"{None if slopes is None else tuple(slopes.shape)}"
        )


def check_step_metadata(query: torch.Tensor, md: BatchMetadata, where: str = OP_NAME) -> None:
    """This step's metadata fits the call (shared by the CPU op and the Triton kernel). Not an
    argument check: the metadata changes every step, so the kernels run it, on counts and shapes
    only (no tensor is read; the state slots' values are checked by ``set_forward_context``)."""
    if md.num_decode_tokens != md.num_decodes:
        raise ValueError(
            f"{where}: decodes take exactly one query token each, but num_decode_tokens="
            f"{md.num_decode_tokens} != num_decodes={md.num_decodes}"
        )
    if query.shape[0] != md.num_tokens:
        raise ValueError(f"{where}: query has {query.shape[0]} tokens but the batch metadata holds {md.num_tokens}")
    if md.state_indices is None or md.state_indices.shape != (md.num_reqs,):
        got = None if md.state_indices is None else tuple(md.state_indices.shape)
        raise ValueError(
            f"{where}: batch metadata needs state_indices of shape [{md.num_reqs}] (one state slot per request), got {got}"
        )
    if md.has_initial_state is None or md.has_initial_state.shape != (md.num_reqs,):
        got = None if md.has_initial_state is None else tuple(md.has_initial_state.shape)
        raise ValueError(f"{where}: batch metadata needs has_initial_state of shape [{md.num_reqs}], got {got}")


def _on_host(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values is free (a CPU tensor); elsewhere the kernel uses only what
    the host knows (shapes, counts), so it never waits on the device."""
    return t.device.type == "cpu"


# ---------------------------------------------------------------- reference math
def decode_ref(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    state_cache: torch.Tensor,
    slopes: torch.Tensor,
    slots: torch.Tensor,
    has_initial_state: torch.Tensor,
) -> torch.Tensor:
    """One recurrence step for ``N`` decode tokens (``query [N, H, Dk]``); updates
    ``state_cache[slots]`` in place and returns float32 ``[N, H, Dv]``."""
    if query.shape[0] == 0:
        return query.new_zeros((0, query.shape[1], value.shape[2]), dtype=torch.float32)
    prev = state_cache[slots].float()
    prev = torch.where(has_initial_state[:, None, None, None], prev, torch.zeros_like(prev))
    decay = torch.exp(-slopes.float())[None, :, None, None]
    state = decay * prev + key.float()[..., :, None] * value.float()[..., None, :]
    state_cache[slots] = state.to(state_cache.dtype)
    return torch.einsum("nhk,nhkv->nhv", query.float(), state)


def prefill_chunked_ref(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    state_cache: torch.Tensor,
    slopes: torch.Tensor,
    query_start_loc: torch.Tensor,
    slots: torch.Tensor,
    has_initial_state: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """Chunked prefill of ``R`` requests whose tokens are ``query[query_start_loc[r]:query_start_loc[r+1]]``
    (offsets relative to ``query``'s row 0). Requests are padded to a common length and
    processed in lockstep, block by block; a request's state only advances over its real
    tokens. ``query`` holds exactly the requests' tokens (``sum(lens)`` rows). Updates
    ``state_cache[slots]``; returns float32 ``[sum(lens), H, Dv]``.

    The padded length is the longest request where ``query_start_loc`` is on the host (``_on_host``),
    else the host-known bound ``query.shape[0] - R + 1`` (every request has >= 1 token): no device
    read; the output rows are gathered by index, not by a boolean mask (which would read one)."""
    if block_size < 1:
        raise ValueError(f"{OP_NAME}: block_size must be >= 1, got {block_size}")
    num_reqs = slots.shape[0]
    h, dv = query.shape[1], value.shape[2]
    dev = query.device
    if num_reqs == 0 or query.shape[0] == 0:
        return query.new_zeros((0, h, dv), dtype=torch.float32)
    starts = query_start_loc[:-1].long()
    lens = (query_start_loc[1:] - query_start_loc[:-1]).long()
    longest = int(lens.max()) if _on_host(lens) else query.shape[0] - num_reqs + 1
    num_blocks = (longest + block_size - 1) // block_size
    length = num_blocks * block_size
    pos = torch.arange(length, device=dev)
    valid = pos[None, :] < lens[:, None]  # [R, L]
    tok = torch.where(valid, starts[:, None] + pos, 0)

    def padded(x: torch.Tensor) -> torch.Tensor:  # [R, H, L, D], zero past each request's end
        g = torch.where(valid[..., None, None], x[tok].float(), 0.0)
        return g.permute(0, 2, 1, 3)

    q, k, v = padded(query), padded(key), padded(value)
    s = slopes.float().to(dev)
    i = torch.arange(block_size, device=dev, dtype=torch.float32)
    diff = i[:, None] - i[None, :]
    # lambda^(i-j) on and below the diagonal (exponent clamped so the masked half stays finite)
    intra = torch.where(diff >= 0, torch.exp(-s[:, None, None] * diff.clamp(min=0)), 0.0)  # [H, B, B]
    q_decay = torch.exp(-s[:, None] * (i + 1))[None, :, :, None]  # [1, H, B, 1]

    prev = state_cache[slots].float()
    state = torch.where(has_initial_state[:, None, None, None], prev, torch.zeros_like(prev))  # [R, H, Dk, Dv]
    out = torch.empty(num_reqs, h, length, dv, dtype=torch.float32, device=dev)
    for b in range(num_blocks):
        sl = slice(b * block_size, (b + 1) * block_size)
        qb, kb, vb = q[:, :, sl], k[:, :, sl], v[:, :, sl]
        scores = (qb @ kb.transpose(-1, -2)) * intra
        out[:, :, sl] = scores @ vb + (qb * q_decay) @ state
        # real tokens of each request in this block; past a request's end the state is untouched
        n = (lens - b * block_size).clamp(0, block_size).float()  # [R]
        expo = n[:, None] - 1 - i[None, :]  # [R, B]: distance from token j to the block's last real token
        k_decay = torch.where(
            expo[:, None, :] >= 0, torch.exp(-s[None, :, None] * expo.clamp(min=0)[:, None, :]), 0.0
        )  # [R, H, B]
        block_decay = torch.exp(-s[None, :] * n[:, None])[..., None, None]  # [R, H, 1, 1]
        state = block_decay * state + (kb * k_decay[..., None]).transpose(-1, -2) @ vb
    state_cache[slots] = state.to(state_cache.dtype)
    t = torch.arange(query.shape[0], device=dev)
    req = torch.searchsorted(query_start_loc[1:].long().contiguous(), t, right=True)
    return out.permute(0, 2, 1, 3)[req, t - starts[req]]


def linear_attention_ref(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    state_cache: torch.Tensor,
    slopes: torch.Tensor,
    md: BatchMetadata,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> torch.Tensor:
    """A whole decode-first batch: decodes from row 0 / slot 0, prefills after them."""
    nd, nt = md.num_decodes, md.num_tokens
    slots, init = md.state_indices, md.has_initial_state
    out_dec = decode_ref(query[:nd], key[:nd], value[:nd], state_cache, slopes, slots[:nd], init[:nd])
    qsl = md.query_start_loc[nd:].long() - nd  # prefill offsets relative to the first prefill row
    out_pre = prefill_chunked_ref(
        query[nd:nt], key[nd:nt], value[nd:nt], state_cache, slopes, qsl, slots[nd:], init[nd:], block_size
    )
    return torch.cat([out_dec, out_pre], dim=0)


def layer_block_size(layer: object) -> int:
    block = getattr(layer, "block_size", DEFAULT_BLOCK_SIZE)
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"{OP_NAME}: layer.block_size must be a positive int, got {block!r}")
    return block


# ---------------------------------------------------------------- the op
def _linear_attention_fake(query, key, value, output, layer_name) -> None:
    check_linear_attention_args(query, key, value, output, find_layer(layer_name))
    return None


@layerpass_op(OP_NAME, mutates_args=("output",), fake=_linear_attention_fake, splits=True)
def _linear_attention_kernel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    output: torch.Tensor,
    layer_name: LayerNameType,
) -> None:
    layer = lookup_layer(layer_name, ("state_cache",), OP_NAME)
    md = get_batch_metadata()
    check_step_metadata(query, md)
    out = linear_attention_ref(query, key, value, layer.state_cache, layer.slopes, md, layer_block_size(layer))
    output.copy_(out)


def linear_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    output: torch.Tensor,
    layer_name: LayerNameType,
) -> None:
    """``query``/``key [T, H, Dk]``, ``value [T, H, Dv]``; writes ``output [T, H, Dv]`` and
    advances the layer's recurrent state of every request in the step's batch:
    ``torch.ops.layerpass.linear_attention`` after its argument checks (in eager; under
    ``torch.compile`` the fake kernel runs them at trace time)."""
    if not torch.compiler.is_compiling():
        check_linear_attention_args(query, key, value, output, find_layer(layer_name))
    torch.ops.layerpass.linear_attention(query, key, value, output, layer_name)

