"""Triton paged attention with the per-layer features (sliding window, soft cap, sinks, any scale),
on CPU tensors under ``TRITON_INTERPRET=1``, against ``reference.attention_features`` (float64,
explicit loops over each request's contiguous history: independent of both kernels)."""

from __future__ import annotations

from tests.helpers.triton import load_interpreted
from tests.helpers.fp8 import assert_fp8_close

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from tests.helpers import reference as ref  # noqa: E402
from layerpass.ops import FP8_DTYPE, LayerRegistry, build_batch_metadata, encode_layer_name, set_forward_context  # noqa: E402

attention = load_interpreted("attention")
ops = torch.ops.layerpass

TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-5}, torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
       torch.float16: {"rtol": 2e-2, "atol": 2e-2}}  # half: P enters the P @ V dot in the model dtype


class FeatureLayer(nn.Module):
    """The state the op resolves by name: a paged KV cache, a scale and the features."""

    def __init__(self, kv_cache: torch.Tensor, scale: float, sliding_window=None, logits_soft_cap=None, sinks=None) -> None:
        super().__init__()
        self.register_buffer("kv_cache", kv_cache)
        self.scale, self.sliding_window, self.logits_soft_cap, self.sinks = scale, sliding_window, logits_soft_cap, sinks


def setup(query_lens, context_lens, *, num_kv_heads, group, head_size, block_size, dtype, seed):
    """Requests with contiguous histories, written into scattered blocks of a garbage-filled cache."""
    g = torch.Generator().manual_seed(seed)
    hq = num_kv_heads * group
    need = [-(-(q + c) // block_size) for q, c in zip(query_lens, context_lens)]
    num_blocks = sum(need) + 2
    perm = torch.randperm(num_blocks, generator=g).tolist()
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    requests, i = [], 0
    for q, c, n in zip(query_lens, context_lens, need):
        requests.append(ref.Request(rnd(c, num_kv_heads, head_size), rnd(c, num_kv_heads, head_size), rnd(q, hq, head_size),
                                    rnd(q, num_kv_heads, head_size), rnd(q, num_kv_heads, head_size), perm[i:i + n]))
        i += n
    cache = (torch.randn(2, num_blocks, block_size, num_kv_heads, head_size, generator=g) * 100).to(dtype)
    ref.fill_paged_cache(cache, requests)
    md = build_batch_metadata(query_lens, context_lens, [r.blocks for r in requests], block_size)
    return md, cache, requests


def run(fn, md, cache, requests, scale, output_scale=None, **features):
    registry = LayerRegistry("attn-features-triton")
    layer = FeatureLayer(cache.clone(), scale, **features)  # the registry holds layers weakly: keep it alive
    registry.register("layers.0.attn", layer)
    cat = lambda n: torch.cat([getattr(r, n) for r in requests])  # noqa: E731
    q = cat("new_q")
    out = torch.empty(q.shape, dtype=FP8_DTYPE if output_scale is not None else q.dtype)
    with set_forward_context(md, registry):
        fn(q, cat("new_k"), cat("new_v"), out, encode_layer_name("layers.0.attn"), output_scale)
    return out, layer.kv_cache


@st.composite
def batches(draw) -> dict:
    """Decode-first: decodes over (possibly long) histories, then prefills, chunked or fresh."""
    num_decodes = draw(st.integers(0, 3))
    num_prefills = draw(st.integers(0 if num_decodes else 1, 2))
    query_lens = [1] * num_decodes + [draw(st.integers(2, 40)) for _ in range(num_prefills)]
    context_lens = [draw(st.integers(1, 70)) for _ in range(num_decodes)]
    context_lens += [draw(st.sampled_from([0, 0, 5, 33, 60])) for _ in range(num_prefills)]
    hq = (hkv := draw(st.integers(1, 2))) * (group := draw(st.sampled_from([1, 2, 3])))
    sinks = draw(st.one_of(st.none(), st.lists(st.floats(-5.0, 5.0), min_size=hq, max_size=hq).map(torch.tensor)))
    return {
        "query_lens": query_lens, "context_lens": context_lens,
        "shape": {"num_kv_heads": hkv, "group": group, "head_size": draw(st.sampled_from([8, 16, 24])),
                  "block_size": draw(st.sampled_from([4, 5, 16])),
                  "dtype": draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
                  "seed": draw(st.integers(0, 2**16))},
        "scale": draw(st.sampled_from([256 ** -0.5, 0.015625, 0.35, 1.0, 1.9])),
        "features": {"sliding_window": draw(st.one_of(st.none(), st.integers(1, 40))),
                     "logits_soft_cap": draw(st.one_of(st.none(), st.sampled_from([0.5, 5.0, 50.0]))),
                     "sinks": sinks},
    }


# No shrink phase: every example runs kernels on the interpreter (see test_attention.py).
@settings(max_examples=14, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(b=batches(), quant=st.booleans())
def test_features_match_reference(b: dict, quant: bool) -> None:
    md, cache, requests = setup(b["query_lens"], b["context_lens"], **b["shape"])
    dtype, feats = b["shape"]["dtype"], b["features"]
    out_scale = torch.tensor([0.02]) if quant else None
    out, new_cache = run(attention.unified_attention_with_output, md, cache, requests, b["scale"], out_scale, **feats)
    cpu, cpu_cache = run(ops.unified_attention_with_output, md, cache, requests, b["scale"], out_scale, **feats)
    assert torch.equal(new_cache, cpu_cache)
    if quant:  # the CPU op's fp8 output is exactly quantize(its model-dtype output), tested on the CPU side
        assert_fp8_close(out, cpu, atol=0.0 if dtype == torch.float32 else 2e-2 / 0.02)
    else:
        expected = ref.attention_features(requests, b["scale"], **feats).to(dtype)
        torch.testing.assert_close(out, expected, **TOL[dtype])


LONG = {"query_lens": [1, 1, 1, 37, 6], "context_lens": [70, 3, 41, 50, 0]}


@pytest.mark.parametrize("features", [
    {"sliding_window": 1},
    {"sliding_window": 7},
    {"sliding_window": 33},
    {"logits_soft_cap": 0.3},
    {"logits_soft_cap": 50.0},
    {"sinks": torch.tensor([-3.0, 0.0, 2.0, 9.0])},
    {"sliding_window": 5, "logits_soft_cap": 2.0, "sinks": torch.tensor([0.5, -1.0, 1.0, 0.0])},
], ids=["window1", "window7", "window33", "cap0.3", "cap50", "sinks", "all"])
def test_long_history_mixed_batch(features: dict) -> None:
    """Decodes over long histories, a prefill chunk over a long history (split over query blocks), a fresh prefill."""
    md, cache, requests = setup(LONG["query_lens"], LONG["context_lens"], num_kv_heads=2, group=2, head_size=16,
                                block_size=8, dtype=torch.float32, seed=7)
    out, _ = run(attention.unified_attention_with_output, md, cache, requests, 0.6, **features)
    torch.testing.assert_close(out, ref.attention_features(requests, 0.6, **features).float(), **TOL[torch.float32])


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (64, 32)])
def test_window_tiles(block_m: int, block_n: int) -> None:
    """The key walk starts at the block's first visible position: windows shorter than, equal to and
    crossing tile and cache-block edges, on other tile sizes."""
    md, cache, requests = setup([1, 1, 45], [30, 16, 21], num_kv_heads=1, group=2, head_size=8, block_size=5,
                                dtype=torch.float32, seed=11)
    _, written = run(ops.unified_attention_with_output, md, cache, requests, 0.5)  # cache incl. this step
    q = torch.cat([r.new_q for r in requests])
    for window in (1, 5, 16, 17, 40):
        out = torch.empty_like(q)
        attention.paged_attention_triton(q, written, md, 0.5, out, block_m=block_m, block_n=block_n, sliding_window=window)
        want = ref.attention_features(requests, 0.5, sliding_window=window).float()
        torch.testing.assert_close(out, want, **TOL[torch.float32], msg=lambda m, w=window: f"window {w}: {m}")


def test_bad_sinks_raise() -> None:
    md, cache, requests = setup([3], [2], num_kv_heads=1, group=2, head_size=8, block_size=4, dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"sinks must be a float tensor of shape \[2\]"):
        run(attention.unified_attention_with_output, md, cache, requests, 0.3, sinks=torch.zeros(3))
    with pytest.raises(ValueError, match="sliding_window must be None or a positive int"):
        run(attention.unified_attention_with_output, md, cache, requests, 0.3, sliding_window=0)
