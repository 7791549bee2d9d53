"""Triton paged attention (KV write + decode/prefill GQA attention, optional FP8 output) vs the CPU op."""

from __future__ import annotations

from tests.helpers.triton import load_interpreted
from tests.helpers.fp8 import assert_fp8_close

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from layerpass.ops import (  # noqa: E402
    FP8_DTYPE,
    LayerRegistry,
    build_batch_metadata,
    encode_layer_name,
    set_forward_context,
)
from layerpass.ops.attention import paged_attention_ref  # noqa: E402
from layerpass.ops.attention import unified_attention_with_output as checked_attention  # noqa: E402

attention = load_interpreted("attention")
ops = torch.ops.layerpass


class CacheLayer(nn.Module):
    """The state an attention op resolves by name: its paged KV cache and softmax scale."""

    def __init__(self, kv_cache: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.register_buffer("kv_cache", kv_cache)
        self.scale = scale


@st.composite
def batches(draw: st.DrawFn) -> dict:
    """A decode-first batch: decodes (1 query, some history), then prefills (any history)."""
    num_decodes = draw(st.integers(0, 3))
    num_prefills = draw(st.integers(0 if num_decodes else 1, 2))
    query_lens = [1] * num_decodes + [draw(st.integers(1, 40)) for _ in range(num_prefills)]
    context_lens = [draw(st.integers(1, 40)) for _ in range(num_decodes)]
    # a prefill of one query with history would be a decode, and those come first: give it none
    context_lens += [0 if q == 1 else draw(st.sampled_from([0, 0, 3, 17, 33])) for q in query_lens[num_decodes:]]
    return {
        "query_lens": query_lens,
        "context_lens": context_lens,
        "num_kv_heads": draw(st.integers(1, 2)),
        "group": draw(st.sampled_from([1, 2, 3])),
        "head_size": draw(st.sampled_from([8, 16, 24])),
        "block_size": draw(st.sampled_from([4, 5, 16])),
        "dtype": draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _setup(b: dict):
    g = torch.Generator().manual_seed(b["seed"])
    bs, hkv, d, dtype = b["block_size"], b["num_kv_heads"], b["head_size"], b["dtype"]
    seq_lens = [q + c for q, c in zip(b["query_lens"], b["context_lens"])]
    need = [-(-s // bs) for s in seq_lens]
    num_blocks = sum(need) + 2
    perm = torch.randperm(num_blocks, generator=g).tolist()  # scattered, non-monotonic blocks
    tables, i = [], 0
    for n in need:
        tables.append(perm[i : i + n])
        i += n
    md = build_batch_metadata(b["query_lens"], b["context_lens"], tables, bs)
    t, hq = md.num_tokens, hkv * b["group"]
    cache = torch.randn(2, num_blocks, bs, hkv, d, generator=g).to(dtype)  # history of earlier steps
    q = torch.randn(t, hq, d, generator=g).to(dtype)
    k = torch.randn(t, hkv, d, generator=g).to(dtype)
    v = torch.randn(t, hkv, d, generator=g).to(dtype)
    return md, cache, q, k, v


def _run(fn, md, cache, q, k, v, scale, output_scale=None):
    registry = LayerRegistry("attn-test")
    layer = CacheLayer(cache.clone(), scale)
    registry.register("layers.0.attn", layer)
    out = torch.empty(q.shape, dtype=FP8_DTYPE if output_scale is not None else q.dtype)
    with set_forward_context(md, registry):
        fn(q, k, v, out, encode_layer_name("layers.0.attn"), output_scale)
    return out, layer.kv_cache


# No shrink phase: every example runs kernels on the interpreter, and shrinking one failure
# takes minutes; the failing example is printed as generated.
@settings(max_examples=14, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(b=batches(), quant=st.booleans())
def test_attention_matches_cpu_op(b: dict, quant: bool) -> None:
    md, cache, q, k, v = _setup(b)
    scale = b["head_size"] ** -0.5
    out_scale = torch.tensor([0.02]) if quant else None
    out, new_cache = _run(attention.unified_attention_with_output, md, cache, q, k, v, scale, out_scale)
    ref, ref_cache = _run(ops.unified_attention_with_output, md, cache, q, k, v, scale, out_scale)
    assert torch.equal(new_cache, ref_cache)  # the KV write is a copy (plus the same cast)
    if quant:  # half dtypes: the output tolerance below, in the quantised domain
        assert_fp8_close(out, ref, atol=0.0 if q.dtype == torch.float32 else 2e-2 / 0.02)
    elif q.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    else:  # probabilities enter the P @ V dot in the model dtype (as on the GPU)
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (64, 64)])
def test_attention_tile_sizes(block_m: int, block_n: int) -> None:
    """Other tiles: query blocks split a long prefill, key tiles cross cache blocks."""
    b = {"query_lens": [1, 1, 37], "context_lens": [5, 20, 9], "num_kv_heads": 2, "group": 2,
         "head_size": 16, "block_size": 8, "dtype": torch.float32, "seed": 3}
    md, cache, q, k, v = _setup(b)
    _, written = _run(ops.unified_attention_with_output, md, cache, q, k, v, 0.25)  # cache incl. this step
    ref = paged_attention_ref(q, written, md, 0.25)
    out = torch.empty_like(q)
    attention.paged_attention_triton(q, written, md, 0.25, out, block_m=block_m, block_n=block_n)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_attention_strided_output_and_bad_input() -> None:
    b = {"query_lens": [3], "context_lens": [4], "num_kv_heads": 1, "group": 2,
         "head_size": 8, "block_size": 4, "dtype": torch.float32, "seed": 0}
    md, cache, q, k, v = _setup(b)
    ref, _ = _run(ops.unified_attention_with_output, md, cache, q, k, v, 0.3)
    registry = LayerRegistry("attn-test")
    layer = CacheLayer(cache.clone(), 0.3)  # the registry holds layers weakly: keep it alive
    registry.register("a", layer)
    wide = torch.zeros(q.shape[0], q.shape[1], 2 * q.shape[2])
    out = wide[..., ::2]  # inner stride 2: written through a temporary
    with set_forward_context(md, registry):
        attention.unified_attention_with_output(q, k, v, out, encode_layer_name("a"))
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        # argument checks: the checked entry point, whichever kernel serves the device (the
        # Triton kernel itself does not check: a compiled step calls it)
        with pytest.raises(ValueError, match="requires an output_scale"):
            checked_attention(q, k, v, torch.empty(q.shape, dtype=FP8_DTYPE), "a")
        with pytest.raises(ValueError, match="not a multiple"):
            checked_attention(q[:, :1].expand(-1, 3, -1), torch.cat([k, k], 1), torch.cat([v, v], 1), torch.empty(3, 3, 8), "a")
        # the step's metadata against the call: the kernel (it changes every step)
        with pytest.raises(ValueError, match="must match its metadata"):
            attention.unified_attention_with_output(q[:2], k[:2], v[:2], torch.empty_like(q[:2]), "a")
        with pytest.raises(KeyError, match="no layer registered"):
            attention.unified_attention_with_output(q, k, v, torch.empty_like(q), "missing")
        with pytest.raises(ValueError, match="block_m must be"):
            attention.paged_attention_triton(q, cache, md, 0.3, torch.empty_like(q), block_m=24)
    with pytest.raises(RuntimeError, match="no batch metadata"):
        with set_forward_context(None, registry):
            attention.unified_attention_with_output(q, k, v, torch.empty_like(q), "a")
