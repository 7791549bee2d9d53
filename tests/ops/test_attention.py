"""``layerpass::unified_attention_with_output``: paged KV write + causal GQA attention.

Mixed decode+prefill batches with ragged lengths (built by ``build_batch_metadata``) are
checked against ``reference.attention`` (per request, per head, plain loops over contiguous
history: no paged cache involved), and the cache contents against where the paged layout
says each token lives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import reference as ref
from layerpass.ops import (
    FP8_DTYPE,
    LayerNotFoundError,
    LayerRegistry,
    build_batch_metadata,
    encode_layer_name,
    layer_registry_scope,
    set_forward_context,
)
from layerpass.ops.attention import unified_attention_with_output

attn = torch.ops.layerpass.unified_attention_with_output
checked_attn = unified_attention_with_output  # the checked entry point (the raw op does not check)
PREFIX = "model.layers.0.self_attn.attn"


@dataclass
class Case:
    layer: ref.AttnLayer
    registry: LayerRegistry
    requests: list[ref.Request]
    query_lens: list[int]
    context_lens: list[int]
    block_size: int
    dtype: torch.dtype

    def metadata(self):
        return build_batch_metadata(self.query_lens, self.context_lens, [r.blocks for r in self.requests], self.block_size)

    def qkv(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cat = lambda name: torch.cat([getattr(r, name) for r in self.requests])  # noqa: E731
        return cat("new_q"), cat("new_k"), cat("new_v")


def make_case(*, decode_ctx: list[int], prefills: list[tuple[int, int]], num_kv_heads: int, group: int,
              head_size: int, block_size: int, dtype: torch.dtype, seed: int) -> Case:
    """Decodes (1 new token over ``decode_ctx[i]`` cached) first, then prefills ``(query, context)``.

    The cache starts full of garbage, histories are written into randomly permuted blocks."""
    g = torch.Generator().manual_seed(seed)
    query_lens = [1] * len(decode_ctx) + [q for q, _ in prefills]
    context_lens = list(decode_ctx) + [c for _, c in prefills]
    need = [math.ceil((q + c) / block_size) for q, c in zip(query_lens, context_lens)]
    num_blocks = sum(need) + 2
    perm = torch.randperm(num_blocks, generator=g).tolist()
    hq = num_kv_heads * group
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    requests, start = [], 0
    for q, c, n in zip(query_lens, context_lens, need):
        requests.append(ref.Request(
            hist_k=rnd(c, num_kv_heads, head_size), hist_v=rnd(c, num_kv_heads, head_size),
            new_q=rnd(q, hq, head_size), new_k=rnd(q, num_kv_heads, head_size), new_v=rnd(q, num_kv_heads, head_size),
            blocks=perm[start:start + n]))
        start += n
    registry = LayerRegistry("attn-test")
    with layer_registry_scope(registry):
        layer = ref.AttnLayer(PREFIX, num_blocks, block_size, num_kv_heads, head_size, dtype)
        registry.register(PREFIX, layer)
    layer.kv_cache.copy_(torch.randn(layer.kv_cache.shape, generator=g) * 100)  # garbage nobody may read
    ref.fill_paged_cache(layer.kv_cache, requests)
    return Case(layer, registry, requests, query_lens, context_lens, block_size, dtype)


# (query_len, context_len) of a prefill; a single token over history would be a decode
prefill = st.tuples(st.integers(1, 7), st.integers(0, 6)).filter(lambda qc: qc[0] > 1 or qc[1] == 0)


@st.composite
def cases(draw) -> Case:
    num_decodes = draw(st.integers(0, 3))
    num_prefills = draw(st.integers(0 if num_decodes else 1, 3))
    return make_case(
        decode_ctx=draw(st.lists(st.integers(1, 10), min_size=num_decodes, max_size=num_decodes)),
        prefills=draw(st.lists(prefill, min_size=num_prefills, max_size=num_prefills)),
        num_kv_heads=draw(st.sampled_from([1, 2])),
        group=draw(st.sampled_from([1, 2, 4])),
        head_size=draw(st.sampled_from([4, 8, 16])),
        block_size=draw(st.sampled_from([1, 2, 4, 8])),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def run(case: Case, output: torch.Tensor, output_scale: torch.Tensor | None = None) -> torch.Tensor:
    q, k, v = case.qkv()
    with set_forward_context(case.metadata(), case.registry):
        attn(q, k, v, output, encode_layer_name(PREFIX), output_scale)
    return output


def small_case(dtype: torch.dtype = torch.float32, seed: int = 0) -> Case:
    return make_case(decode_ctx=[3, 5], prefills=[(4, 0), (3, 2)], num_kv_heads=2, group=2, head_size=8,
                     block_size=4, dtype=dtype, seed=seed)


@settings(max_examples=40, deadline=None)
@given(cases())
def test_matches_reference_and_writes_cache(case: Case) -> None:
    q, _, _ = case.qkv()
    out = run(case, torch.empty_like(q))
    expected = ref.attention(case.requests, case.layer.scale)
    torch.testing.assert_close(out.double(), expected, **ref.TOL[case.dtype])
    # every request's full history (old + this step's tokens) is now where the paged layout puts it
    for r, qlen, clen in zip(case.requests, case.query_lens, case.context_lens):
        k_cached, v_cached = ref.read_paged(case.layer.kv_cache, r.blocks, qlen + clen)
        assert torch.equal(k_cached, torch.cat([r.hist_k, r.new_k]))
        assert torch.equal(v_cached, torch.cat([r.hist_v, r.new_v]))


@settings(max_examples=20, deadline=None)
@given(cases(), st.sampled_from([0.004, 0.05, 0.3, 2.0]))
def test_fp8_output_equals_quantised_output(case: Case, scale: float) -> None:
    """The fp8 path writes exactly quantize(the model-dtype output); small scales saturate."""
    q, _, _ = case.qkv()
    plain = run(case, torch.empty_like(q))
    fp8 = run(case, torch.empty(q.shape, dtype=FP8_DTYPE), torch.tensor(scale))
    assert torch.equal(ref.fp8_bits(fp8), ref.fp8_bits(ref.quant_fp8(plain, scale)))
    if scale == 0.004 and plain.numel():
        assert fp8.float().abs().max() <= 448.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype: torch.dtype) -> None:
    case = small_case(dtype)
    q, k, v = case.qkv()
    with set_forward_context(case.metadata(), case.registry):
        torch.library.opcheck(attn.default, (q, k, v, torch.empty_like(q), encode_layer_name(PREFIX)))


def test_opcheck_fp8_output() -> None:
    # opcheck's schema test compares tensors with allclose, which CPU torch lacks for fp8, so the
    # "only `output` is mutated" half of it is checked by hand below.
    case = small_case()
    q, k, v = case.qkv()
    before = [t.clone() for t in (q, k, v)]
    with set_forward_context(case.metadata(), case.registry):
        torch.library.opcheck(
            attn.default, (q, k, v, torch.empty(q.shape, dtype=FP8_DTYPE), encode_layer_name(PREFIX), torch.tensor(0.1)),
            test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"),
        )
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v)))


def test_fake_needs_no_layer_and_touches_nothing() -> None:
    """Under FakeTensorMode the op neither resolves the layer nor writes the cache, and
    leaves ``output`` with its shape and dtype (what tracing relies on)."""
    case = small_case()
    q, k, v = case.qkv()
    cache_before = case.layer.kv_cache.clone()
    for out, scale in ((torch.empty_like(q), None), (torch.empty(q.shape, dtype=FP8_DTYPE), torch.tensor(0.5))):
        result, fargs = ref.fake_outputs(attn, q, k, v, out, encode_layer_name("no.such.layer"), scale)
        assert result is None
        assert (fargs[3].shape, fargs[3].dtype) == (out.shape, out.dtype)
    assert torch.equal(case.layer.kv_cache, cache_before)


def _bad_calls():
    """(label, mutate(q, k, v, out, name, scale) -> args, error type, message fragment)."""
    fp8_out = lambda q: torch.empty(q.shape, dtype=FP8_DTYPE)  # noqa: E731
    return [
        ("2-D query", lambda q, k, v, o, n, s: (q.flatten(1), k, v, o, n, s), ValueError, "query must be 3-D"),
        ("key/value shapes differ", lambda q, k, v, o, n, s: (q, k, v[:, :1], o, n, s), ValueError, "do not match"),
        ("head size differs", lambda q, k, v, o, n, s: (q[..., :4].contiguous(), k, v, o[..., :4].contiguous(), n, s), ValueError, "do not match"),
        ("GQA not a multiple", lambda q, k, v, o, n, s: (q[:, :3].contiguous(), k, v, o[:, :3].contiguous(), n, s), ValueError, "not a multiple"),
        ("output shape", lambda q, k, v, o, n, s: (q, k, v, o[:, :2].contiguous(), n, s), ValueError, "output"),
        ("int query", lambda q, k, v, o, n, s: (q.int(), k, v, o, n, s), ValueError, "float dtype"),
        ("mixed dtypes", lambda q, k, v, o, n, s: (q, k.double(), v.double(), o, n, s), ValueError, "float dtype"),
        ("output dtype", lambda q, k, v, o, n, s: (q, k, v, o.double(), n, s), ValueError, "output dtype"),
        ("fp8 output, no scale", lambda q, k, v, o, n, s: (q, k, v, fp8_out(q), n, None), ValueError, "output_scale"),
        ("scale, not fp8 output", lambda q, k, v, o, n, s: (q, k, v, o, n, torch.tensor(1.0)), ValueError, "output_scale"),
        ("per-head scale", lambda q, k, v, o, n, s: (q, k, v, fp8_out(q), n, torch.ones(4)), ValueError, "one-element scale"),
        ("tokens vs metadata", lambda q, k, v, o, n, s: (q[:-1], k[:-1], v[:-1], o[:-1], n, s), ValueError, "metadata"),
        ("cache heads", lambda q, k, v, o, n, s: (q, k[:, :1].contiguous(), v[:, :1].contiguous(), o, n, s), ValueError, "KV cache"),
    ]


@pytest.mark.parametrize("label,mutate,exc,fragment", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_input_raises_clear_error(label, mutate, exc, fragment) -> None:
    case = small_case()
    q, k, v = case.qkv()
    args = mutate(q, k, v, torch.empty_like(q), encode_layer_name(PREFIX), None)
    with set_forward_context(case.metadata(), case.registry), pytest.raises(exc, match=fragment):
        checked_attn(*args)  # the entry point checks the arguments; the kernel, the metadata's token count


def test_unknown_layer_lists_close_names() -> None:
    case = small_case()
    q, k, v = case.qkv()
    with set_forward_context(case.metadata(), case.registry), pytest.raises(LayerNotFoundError) as info:
        attn(q, k, v, torch.empty_like(q), encode_layer_name("model.layers.0.self_attn.atn"))
    assert PREFIX in info.value.closest
    assert PREFIX in str(info.value) and "model.layers.0.self_attn.atn" in str(info.value)


def test_outside_forward_context_raises() -> None:
    case = small_case()
    q, k, v = case.qkv()
    with layer_registry_scope(case.registry), pytest.raises(RuntimeError, match="set_forward_context"):
        attn(q, k, v, torch.empty_like(q), encode_layer_name(PREFIX))
