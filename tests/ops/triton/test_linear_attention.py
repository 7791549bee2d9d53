"""The Triton linear-attention kernels (decode recurrence, chunked prefill) against the CPU reference.

They run through the Triton interpreter (``tests/helpers/triton.py``, ``conftest.py``), on CPU
tensors here; with a GPU, also through the op's CUDA slot."""

from __future__ import annotations

from tests.helpers.triton import load_interpreted

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

tla = load_interpreted("linear_attention")

from layerpass.ops import LayerRegistry, build_batch_metadata, encode_layer_name, set_forward_context  # noqa: E402
from layerpass.ops.linear_attention import linear_attention_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAME = "model.layers.1.linear_attn"


@st.composite
def mixes(draw):
    """A decode-first batch: (query_lens, context_lens, slot of each request, number of slots)."""
    nd = draw(st.integers(0, 4))
    prefills = draw(st.lists(st.tuples(st.integers(1, 40), st.booleans()), min_size=0 if nd else 1, max_size=3))
    prefills = [(max(n, 2) if resumed else n, resumed) for n, resumed in prefills]  # 1 token + history = a decode
    q_lens = [1] * nd + [n for n, _ in prefills]
    ctx = [draw(st.integers(1, 9)) for _ in range(nd)] + [5 if resumed else 0 for _, resumed in prefills]
    num_slots = len(q_lens) + draw(st.integers(0, 2))
    slots = draw(st.permutations(range(num_slots)))[: len(q_lens)]
    return q_lens, ctx, slots, num_slots


def _inputs(q_lens, heads, dk, dv, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    t = sum(q_lens)
    q = torch.randn(t, heads, dk, generator=g) * dk**-0.5
    k, v = torch.randn(t, heads, dk, generator=g), torch.randn(t, heads, dv, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize(
    "dtype,state_dtype,tol", [(torch.float32, torch.float32, 1e-4), (torch.bfloat16, torch.bfloat16, 3e-2)]
)
@settings(max_examples=8, deadline=None)
@given(mix=mixes(), dims=st.sampled_from([(2, 16, 16), (1, 8, 24), (3, 32, 80)]), seed=st.integers(0, 2**16))
def test_kernels_match_reference(dtype, state_dtype, tol, mix, dims, seed):
    q_lens, ctx, slots, num_slots = mix
    heads, dk, dv = dims
    tables = [[6 * r + j for j in range(6)] for r in range(len(q_lens))]  # each request its own blocks
    md = build_batch_metadata(q_lens, ctx, tables, 8, state_indices=slots)
    q, k, v = _inputs(q_lens, heads, dk, dv, dtype, seed)
    slopes = torch.linspace(0.02, 0.6, heads)
    cache = torch.randn(num_slots, heads, dk, dv, generator=torch.Generator().manual_seed(seed)).to(state_dtype)
    ref_cache = cache.clone()
    ref = linear_attention_ref(q, k, v, ref_cache, slopes, md, block_size=16).to(dtype)

    out = torch.zeros_like(ref)
    nd = md.num_decodes
    slots_t, init = md.state_indices, md.has_initial_state
    tla.linear_attention_decode_triton(q[:nd], k[:nd], v[:nd], out[:nd], cache, slopes, slots_t[:nd], init[:nd])
    tla.linear_attention_prefill_triton(
        q, k, v, out, cache, slopes, md.query_start_loc[nd:], slots_t[nd:], init[nd:], block=16
    )
    scale = max(float(ref.abs().max()), 1.0)
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol * scale)
    torch.testing.assert_close(cache.float(), ref_cache.float(), rtol=tol, atol=tol * float(ref_cache.abs().max()))


class _Layer(nn.Module):
    def __init__(self, cache: torch.Tensor, slopes: torch.Tensor) -> None:
        super().__init__()
        self.state_cache, self.slopes = cache, slopes


def test_op_entry_point_with_layer_name():
    """``linear_attention_triton`` is what the op's CUDA slot calls: layer by name, decode-first metadata."""
    q_lens, ctx, slots = [1, 1, 20, 3], [4, 2, 0, 6], [2, 0, 3, 1]
    heads, dk, dv = 2, 16, 16
    tables = [[4 * r + j for j in range(4)] for r in range(4)]  # each request its own blocks
    md = build_batch_metadata(q_lens, ctx, tables, 8, state_indices=slots, device=DEVICE)
    q, k, v = (x.to(DEVICE) for x in _inputs(q_lens, heads, dk, dv, torch.float32, 5))
    slopes = torch.tensor([0.1, 0.4], device=DEVICE)
    cache = torch.randn(4, heads, dk, dv, device=DEVICE)
    ref_cache = cache.clone()
    ref = linear_attention_ref(q, k, v, ref_cache, slopes, md, block_size=8)
    layer = _Layer(cache, slopes)
    registry = LayerRegistry("triton")
    registry.register(NAME, layer)
    out = torch.zeros_like(ref)
    with set_forward_context(md, registry):
        tla.linear_attention_triton(q, k, v, out, encode_layer_name(NAME))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache, ref_cache, rtol=1e-4, atol=1e-4)


def test_bad_block_and_strides_raise():
    q = torch.zeros(4, 1, 16)
    cache = torch.zeros(1, 1, 16, 16)
    args = (q, q, q, q.clone(), cache, torch.ones(1), torch.tensor([0, 4]), torch.tensor([0]), torch.tensor([False]))
    with pytest.raises(ValueError, match="power of two >= 16"):
        tla.linear_attention_prefill_triton(*args, block=24)
    strided = torch.zeros(4, 1, 32)[..., ::2]
    with pytest.raises(ValueError, match="contiguous last dimension"):
        tla.linear_attention_prefill_triton(strided, *args[1:], block=16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the op's CUDA slot needs a GPU")
def test_op_dispatches_to_triton_on_cuda():
    from layerpass.ops import op_overload

    q_lens, ctx, slots = [1, 7], [3, 0], [1, 0]
    tables = [[2 * r + j for j in range(2)] for r in range(2)]  # each request its own blocks
    md = build_batch_metadata(q_lens, ctx, tables, 8, state_indices=slots, device="cuda")
    q, k, v = (x.cuda() for x in _inputs(q_lens, 2, 16, 16, torch.float32, 1))
    cache = torch.randn(2, 2, 16, 16, device="cuda")
    ref_cache = cache.clone()
    slopes = torch.tensor([0.1, 0.4], device="cuda")
    ref = linear_attention_ref(q, k, v, ref_cache, slopes, md)
    registry = LayerRegistry("cuda")
    layer = _Layer(cache, slopes)
    registry.register(NAME, layer)
    out = torch.zeros_like(ref)
    with set_forward_context(md, registry):
        op_overload("linear_attention")(q, k, v, out, encode_layer_name(NAME))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
