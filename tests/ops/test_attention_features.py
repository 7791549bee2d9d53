"""Per-layer attention features of ``unified_attention_with_output`` on the CPU kernel.

Sliding window, logit soft-capping, learned sinks and arbitrary softmax scales, alone and
combined, over mixed decode-first batches (long histories behind a short window included),
against ``reference.attention_features`` (float64, per request, per head, per key: explicit
loops written from the definitions, not from the op). The features are layer attributes read
through the layer's name; the op's schema and arguments are unchanged. The compile test shows
layers differing only in these values share one compiled piece.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tests.helpers import reference as ref
from tests.ops.test_attention import PREFIX, Case, make_case, run
from layerpass.layers import Attention
from layerpass.layers.attention import CacheConfig
from layerpass.ops import FP8_DTYPE, LayerRegistry, build_batch_metadata, encode_layer_name, layer_registry_scope, set_forward_context

attn = torch.ops.layerpass.unified_attention_with_output

# Gemma 2 (query_pre_attn_scalar 256), Granite (attention_multiplier), plain 1/sqrt(d), odd ones
SCALES = [256 ** -0.5, 0.015625, 0.3, 1.0, 1.7, -0.4]


def set_features(case: Case, *, scale: float | None = None, sliding_window: int | None = None,
                 logits_soft_cap: float | None = None, sinks: torch.Tensor | None = None) -> None:
    """Give the test layer its features (plain attributes, as ``Attention`` has them)."""
    if scale is not None:
        case.layer.scale = scale
    case.layer.sliding_window = sliding_window
    case.layer.logits_soft_cap = logits_soft_cap
    case.layer.sinks = sinks


def expected(case: Case, **features) -> torch.Tensor:
    return ref.attention_features(case.requests, case.layer.scale, **features)


@st.composite
def feature_cases(draw) -> tuple[Case, dict]:
    """A decode-first batch whose histories may be much longer than the window, plus features."""
    num_decodes = draw(st.integers(0, 3))
    num_prefills = draw(st.integers(0 if num_decodes else 1, 2))
    decode_ctx = draw(st.lists(st.integers(1, 40), min_size=num_decodes, max_size=num_decodes))
    prefills = draw(st.lists(st.tuples(st.integers(1, 9), st.sampled_from([0, 0, 2, 13, 30])).filter(
        lambda qc: qc[0] > 1 or qc[1] == 0), min_size=num_prefills, max_size=num_prefills))
    num_kv_heads, group = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2, 3]))
    case = make_case(decode_ctx=decode_ctx, prefills=prefills, num_kv_heads=num_kv_heads, group=group,
                     head_size=draw(st.sampled_from([4, 8, 16])), block_size=draw(st.sampled_from([1, 4, 5, 16])),
                     dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])), seed=draw(st.integers(0, 2**31 - 1)))
    hq = num_kv_heads * group
    features = {
        "sliding_window": draw(st.one_of(st.none(), st.integers(1, 12), st.sampled_from([1, 50]))),
        "logits_soft_cap": draw(st.one_of(st.none(), st.sampled_from([0.5, 2.0, 30.0, 50.0]))),
        "sinks": draw(st.one_of(st.none(), st.lists(st.floats(-6.0, 6.0, allow_nan=False), min_size=hq, max_size=hq).map(
            lambda xs: torch.tensor(xs)))),
    }
    case.layer.scale = draw(st.one_of(st.sampled_from(SCALES), st.floats(0.01, 4.0)))
    return case, features


@settings(max_examples=25, deadline=None)
@given(feature_cases())
def test_features_match_reference(cf) -> None:
    case, features = cf
    set_features(case, **features)
    q, _, _ = case.qkv()
    out = run(case, torch.empty_like(q))
    torch.testing.assert_close(out.double(), expected(case, **features), **ref.TOL[case.dtype])
    for r, qlen, clen in zip(case.requests, case.query_lens, case.context_lens):  # the KV write is unchanged
        k_cached, v_cached = ref.read_paged(case.layer.kv_cache, r.blocks, qlen + clen)
        assert torch.equal(k_cached, torch.cat([r.hist_k, r.new_k])) and torch.equal(v_cached, torch.cat([r.hist_v, r.new_v]))


@settings(max_examples=15, deadline=None)
@given(feature_cases(), st.sampled_from([0.004, 0.05, 0.3]))
def test_fp8_output_with_features(cf, out_scale: float) -> None:
    """With features the fp8 output is still exactly quantize(the model-dtype output)."""
    case, features = cf
    set_features(case, **features)
    q, _, _ = case.qkv()
    plain = run(case, torch.empty_like(q))
    fp8 = run(case, torch.empty(q.shape, dtype=FP8_DTYPE), torch.tensor(out_scale))
    assert torch.equal(ref.fp8_bits(fp8), ref.fp8_bits(ref.quant_fp8(plain, out_scale)))


def long_history_case(dtype=torch.float32, seed: int = 1) -> Case:
    """Decodes over long histories, then a prefill chunk over a long history and a fresh prefill."""
    return make_case(decode_ctx=[57, 3, 20], prefills=[(9, 40), (6, 0)], num_kv_heads=2, group=2, head_size=8,
                     block_size=4, dtype=dtype, seed=seed)


@pytest.mark.parametrize("window", [1, 2, 5, 8, 16, 70])
def test_sliding_window_long_history_chunked_prefill(window: int) -> None:
    case = long_history_case()
    set_features(case, sliding_window=window)
    q, _, _ = case.qkv()
    out = run(case, torch.empty_like(q))
    torch.testing.assert_close(out.double(), expected(case, sliding_window=window), **ref.TOL[torch.float32])
    full = ref.attention(case.requests, case.layer.scale)
    if window >= 66:  # covers every request's whole sequence: plain causal attention
        torch.testing.assert_close(out.double(), full, **ref.TOL[torch.float32])
    else:
        assert not torch.allclose(out.double(), full, atol=1e-3)


def test_window_one_sees_only_itself() -> None:
    """``sliding_window=1``: each query's own value (for the head's KV head), HF's ``kv > q - 1``."""
    case = long_history_case()
    set_features(case, sliding_window=1)
    q, _, v = case.qkv()
    out = run(case, torch.empty_like(q))
    torch.testing.assert_close(out, v.repeat_interleave(2, dim=1))


def test_window_boundary_is_hf_convention() -> None:
    """The window is (p - W, p]: exactly W keys, the query's own included (a W+1 window differs)."""
    case = make_case(decode_ctx=[10], prefills=[], num_kv_heads=1, group=1, head_size=4, block_size=4,
                     dtype=torch.float32, seed=5)
    r = case.requests[0]
    keys, values = torch.cat([r.hist_k, r.new_k]).double(), torch.cat([r.hist_v, r.new_v]).double()
    scores = (keys[-3:, 0] @ r.new_q[0, 0].double()) * case.layer.scale  # positions 8, 9, 10
    want = torch.softmax(scores, 0) @ values[-3:, 0]
    set_features(case, sliding_window=3)
    q, _, _ = case.qkv()
    out = run(case, torch.empty_like(q))
    torch.testing.assert_close(out[0, 0].double(), want)


@pytest.mark.parametrize("cap", [0.1, 1.0, 50.0])
def test_soft_cap(cap: float) -> None:
    case = long_history_case()
    set_features(case, scale=1.3, logits_soft_cap=cap)
    q, _, _ = case.qkv()
    out = run(case, torch.empty_like(q))
    torch.testing.assert_close(out.double(), expected(case, logits_soft_cap=cap), **ref.TOL[torch.float32])


def test_huge_soft_cap_is_no_cap_and_small_cap_flattens() -> None:
    case = long_history_case()
    q, _, _ = case.qkv()
    set_features(case, scale=1.0, logits_soft_cap=1e6)
    torch.testing.assert_close(run(case, torch.empty_like(q)).double(), ref.attention(case.requests, 1.0), atol=1e-5, rtol=1e-5)
    # a tiny cap squashes every score to ~0: uniform weights, the mean of the visible values
    set_features(case, scale=1.0, logits_soft_cap=1e-6)
    out = run(case, torch.empty_like(q))
    r = case.requests[0]  # the first decode sees its whole history and itself
    mean = torch.cat([r.hist_v, r.new_v])[:, 0].double().mean(0)
    torch.testing.assert_close(out[0, 0].double(), mean, atol=1e-5, rtol=1e-5)


def test_sinks() -> None:
    case = long_history_case()
    q, _, _ = case.qkv()
    plain = run(case, torch.empty_like(q)).clone()
    sinks = torch.tensor([-2.0, 0.0, 1.5, 8.0])
    set_features(case, sinks=sinks)
    out = run(case, torch.empty_like(q))
    torch.testing.assert_close(out.double(), expected(case, sinks=sinks), **ref.TOL[torch.float32])
    # no value: a sink only scales each row's weights down, by sum / (sum + exp(sink))
    assert (out[:, 3].abs() < plain[:, 3].abs() + 1e-6).all()
    # a very negative sink is no sink
    set_features(case, sinks=torch.full((4,), -1e4))
    torch.testing.assert_close(run(case, torch.empty_like(q)), plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_features_combined(dtype) -> None:
    case = long_history_case(dtype)
    feats = {"sliding_window": 6, "logits_soft_cap": 2.0, "sinks": torch.tensor([0.5, -1.0, 2.0, 0.0])}
    set_features(case, scale=256 ** -0.5 * 4, **feats)
    q, _, _ = case.qkv()
    out = run(case, torch.empty_like(q))
    torch.testing.assert_close(out.double(), expected(case, **feats), **ref.TOL[dtype])


# ----------------------------------------------------------------------------- the Attention layer


def build_attention(prefix: str = "model.layers.0.self_attn.attn", **kw) -> tuple[Attention, LayerRegistry]:
    registry = LayerRegistry("attn-features")
    with layer_registry_scope(registry):
        layer = Attention(4, 8, kw.pop("scale", 0.3), 2, prefix=prefix, cache=CacheConfig(32, 4), **kw)
    return layer, registry


def test_attention_layer_defaults_and_sinks_parameter() -> None:
    layer, _ = build_attention()
    assert (layer.sliding_window, layer.logits_soft_cap, layer.sinks) == (None, None, None)
    assert "sinks" not in dict(layer.named_parameters())
    layer, _ = build_attention(sliding_window=4, logits_soft_cap=30, use_sinks=True)
    assert (layer.sliding_window, layer.logits_soft_cap) == (4, 30.0) and isinstance(layer.logits_soft_cap, float)
    assert isinstance(layer.sinks, nn.Parameter) and layer.sinks.shape == (4,) and not layer.sinks.any()
    assert dict(layer.named_parameters())["sinks"] is layer.sinks  # a weight loader finds it by name
    with torch.no_grad():
        layer.sinks.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert "sliding_window=4" in repr(layer) and "logits_soft_cap=30" in repr(layer) and "sinks" in repr(layer)


def test_attention_layer_end_to_end() -> None:
    """``Attention`` built with every feature, sinks loaded, matches the reference; scale any float."""
    scale = 256 ** -0.5
    layer, registry = build_attention(scale=scale, sliding_window=3, logits_soft_cap=5.0, use_sinks=True)
    sinks = torch.tensor([0.3, -0.7, 1.1, 2.5])
    with torch.no_grad():
        layer.sinks.copy_(sinks)
    g = torch.Generator().manual_seed(0)
    hist = [torch.randn(c, 2, 8, generator=g) for c in (11, 0)]
    hist_v = [torch.randn(c, 2, 8, generator=g) for c in (11, 0)]
    blocks = [[5, 2, 7, 0], [9, 3]]
    reqs = [ref.Request(hk, hv, torch.randn(q, 4, 8, generator=g), torch.randn(q, 2, 8, generator=g),
                        torch.randn(q, 2, 8, generator=g), b) for hk, hv, q, b in zip(hist, hist_v, (1, 6), blocks)]
    ref.fill_paged_cache(layer.kv_cache, reqs)
    md = build_batch_metadata([1, 6], [11, 0], blocks, 4)
    cat = lambda n: torch.cat([getattr(r, n) for r in reqs]).flatten(1)  # noqa: E731
    with set_forward_context(md, registry):
        out = layer(cat("new_q"), cat("new_k"), cat("new_v"))
    want = ref.attention_features(reqs, scale, sliding_window=3, logits_soft_cap=5.0, sinks=sinks)
    torch.testing.assert_close(out.view(-1, 4, 8).double(), want, **ref.TOL[torch.float32])


@pytest.mark.parametrize("kw,fragment", [
    ({"sliding_window": 0}, "sliding_window must be None or a positive int"),
    ({"sliding_window": -3}, "sliding_window must be None or a positive int"),
    ({"sliding_window": 4.0}, "sliding_window must be None or a positive int"),
    ({"sliding_window": True}, "sliding_window must be None or a positive int"),
    ({"sliding_window": "4"}, "sliding_window must be None or a positive int"),
    ({"logits_soft_cap": 0.0}, "logits_soft_cap must be None or a positive finite float"),
    ({"logits_soft_cap": -30.0}, "logits_soft_cap must be None or a positive finite float"),
    ({"logits_soft_cap": math.inf}, "logits_soft_cap must be None or a positive finite float"),
    ({"logits_soft_cap": math.nan}, "logits_soft_cap must be None or a positive finite float"),
    ({"logits_soft_cap": "50"}, "logits_soft_cap must be None or a positive finite float"),
    ({"use_sinks": 1}, "use_sinks must be a bool"),
    ({"scale": math.nan}, "scale must be a finite real number"),
    ({"scale": math.inf}, "scale must be a finite real number"),
    ({"scale": None}, "scale must be a finite real number"),
])
def test_attention_layer_rejects_bad_features(kw, fragment) -> None:
    prefix = "model.layers.3.self_attn.attn"
    with pytest.raises(ValueError, match=fragment) as info:
        build_attention(prefix, **kw)
    assert prefix in str(info.value)


def test_op_checks_layer_features_at_call_time() -> None:
    """A layer whose attributes were changed to bad values fails with a clear error, before the KV write."""
    for attr, value, fragment in (("sliding_window", 0, "sliding_window"), ("logits_soft_cap", -1.0, "logits_soft_cap"),
                                  ("sinks", torch.zeros(3), r"sinks must be a float tensor of shape \[4\]"),
                                  ("sinks", torch.zeros(4, dtype=torch.int32), "sinks must be a float tensor"),
                                  ("scale", float("nan"), "scale")):
        case = make_case(decode_ctx=[3], prefills=[(4, 0)], num_kv_heads=2, group=2, head_size=8, block_size=4,
                         dtype=torch.float32, seed=0)
        setattr(case.layer, attr, value)
        before = case.layer.kv_cache.clone()
        q, _, _ = case.qkv()
        with pytest.raises(ValueError, match=fragment):
            run(case, torch.empty_like(q))
        assert torch.equal(case.layer.kv_cache, before)


def test_opcheck_with_features() -> None:
    case = make_case(decode_ctx=[3, 5], prefills=[(4, 0), (3, 2)], num_kv_heads=2, group=2, head_size=8,
                     block_size=4, dtype=torch.float32, seed=0)
    set_features(case, sliding_window=2, logits_soft_cap=3.0, sinks=torch.tensor([0.1, 0.2, 0.3, 0.4]))
    q, k, v = case.qkv()
    with set_forward_context(case.metadata(), case.registry):
        torch.library.opcheck(attn.default, (q, k, v, torch.empty_like(q), encode_layer_name(PREFIX)))


# ----------------------------------------------------------------------------- compile: one piece


class _Block(nn.Module):
    def __init__(self, i: int, hidden: int, heads: int, kv_heads: int, head: int, **features) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head = heads, kv_heads, head
        self.qkv = nn.Linear(hidden, (heads + 2 * kv_heads) * head, bias=False)
        self.attn = Attention(heads, head, head ** -0.5, kv_heads, prefix=f"model.layers.{i}.self_attn.attn",
                              cache=CacheConfig(16, 4), **features)
        self.o = nn.Linear(heads * head, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split([self.heads * self.head, self.kv_heads * self.head, self.kv_heads * self.head], -1)
        return x + self.o(self.attn(q, k, v))


class _Model(nn.Module):
    def __init__(self, layer_features: list[dict]) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 16)
        self.layers = nn.ModuleList(_Block(i, 16, 4, 2, 8, **f) for i, f in enumerate(layer_features))
        self.out = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return self.out(x)


@pytest.mark.slow
@pytest.mark.parametrize("trace", ["regions", "whole-model"])
def test_layers_differing_only_in_features_share_one_piece(trace: str) -> None:
    """Sliding vs global, different windows, caps and sink values: one compiled decoder-layer piece,
    outputs equal eager (which really uses the features: it differs from a feature-free model).
    ``regions``: ``layerpass.compile``; ``whole-model``: Dynamo traces the model, the backend splits it."""
    from tests.helpers import backend as bh

    import layerpass
    from layerpass.backend.pieces.compiler import LayerpassBackend
    from layerpass.backend.config import CompilationConfig

    features = [
        {"sliding_window": 3, "logits_soft_cap": 5.0, "use_sinks": True},
        {},
        {"sliding_window": 9, "logits_soft_cap": 30.0, "use_sinks": True},
        {"sliding_window": 2},
    ]
    registry = LayerRegistry("attn-features-compile")
    with layer_registry_scope(registry), torch.random.fork_rng():
        torch.manual_seed(0)
        model = _Model(features).eval()
    with torch.no_grad():
        model.layers[0].attn.sinks.copy_(torch.tensor([1.0, -1.0, 0.5, 2.0]))
        model.layers[2].attn.sinks.copy_(torch.tensor([-0.5, 3.0, 0.0, 1.0]))
    # decode-first: two decodes over history, a prefill chunk over history, a fresh prefill
    query_lens, context_lens = [1, 1, 5, 4], [9, 4, 6, 0]
    tables, nxt = [], 0
    for q, c in zip(query_lens, context_lens):
        n = -(-(q + c) // 4)
        tables.append(list(range(nxt, nxt + n)))
        nxt += n
    md = build_batch_metadata(query_lens, context_lens, tables, 4)
    g = torch.Generator().manual_seed(1)
    caches = [torch.randn(layer.attn.kv_cache.shape, generator=g) for layer in model.layers]
    x = torch.randn(md.num_tokens, 16, generator=g)

    def step(fn):
        for layer, c in zip(model.layers, caches):  # every run starts from the same history
            layer.attn.kv_cache.copy_(c)
        with torch.no_grad(), set_forward_context(md, registry):
            return fn(x)

    eager = step(model)
    saved = [(a.sliding_window, a.logits_soft_cap, a.sinks) for a in (layer.attn for layer in model.layers)]
    for layer in model.layers:
        layer.attn.sliding_window = layer.attn.logits_soft_cap = layer.attn.sinks = None
    assert not torch.allclose(step(model), eager, atol=1e-3), "the features changed nothing: the test proves nothing"
    for layer, (w, cap, sinks) in zip(model.layers, saved):
        layer.attn.sliding_window, layer.attn.logits_soft_cap, layer.attn.sinks = w, cap, sinks
    torch.testing.assert_close(step(model), eager, rtol=0, atol=0)
    config = CompilationConfig(cache_dir=bh.fresh_cache_dir("attnfeat"), disable_cache=True)
    if trace == "regions":
        compiled = layerpass.compile(model, config)
    else:
        torch.compiler.reset()
        compiled = torch.compile(model, backend=LayerpassBackend(config))
    out = step(compiled)
    report = layerpass.last_compile_report()
    assert report.trace == trace
    layer_keys = {p.key for p in report.pieces if p.layer is not None}
    assert len([p for p in report.pieces if p.layer is not None]) == len(features)
    assert len(layer_keys) == 1, f"layers differing only in attention features got {len(layer_keys)} pieces"
    assert report.num_compiled <= report.num_pieces - len(features) + 1
    bh.assert_matches(out, eager)
