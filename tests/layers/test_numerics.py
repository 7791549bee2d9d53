"""Layer numerics against independent eager references, and constructor validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from layerpass.layers import (
    Attention,
    CacheConfig,
    Fp8Config,
    FusedMoE,
    LogitsProcessor,
    ParallelLMHead,
    QKVParallelLinear,
    ReplicatedLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    SiluAndMul,
    VocabParallelEmbedding,
    get_linear_method,
    init_seed_scope,
)
from layerpass.ops import FP8_DTYPE, LayerRegistry, build_batch_metadata, layer_registry_scope, set_forward_context

from tests.helpers.fp8 import FP8_MAX  # noqa: E402


def scope():
    return layer_registry_scope(LayerRegistry())


@settings(max_examples=10, deadline=None)
@given(t=st.integers(1, 6), heads=st.integers(1, 3), d=st.sampled_from([4, 8]), partial=st.booleans(),
       neox=st.booleans(), seed=st.integers(0, 999))
def test_rotary_matches_complex_rotation(t, heads, d, partial, neox, seed):
    rot = d // 2 if partial else d
    with scope():
        rope = RotaryEmbedding(d, rot, max_position=64, base=100.0, is_neox_style=neox, prefix="r")
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 64, (t,), generator=g)
    q, k = torch.randn(t, heads * d, generator=g), torch.randn(t, heads * d, generator=g)
    q_out, k_out = rope(pos, q, k)
    for x, y in ((q, q_out), (k, k_out)):
        x3 = x.double().view(t, heads, d)
        part = x3[..., :rot]
        if neox:
            z = torch.complex(part[..., : rot // 2], part[..., rot // 2 :])
        else:
            z = torch.complex(part[..., 0::2], part[..., 1::2])
        angle = pos.double()[:, None] * 100.0 ** (-torch.arange(0, rot, 2, dtype=torch.float64) / rot)
        z = z * torch.exp(1j * angle)[:, None, :]
        r = torch.cat((z.real, z.imag), -1) if neox else torch.stack((z.real, z.imag), -1).flatten(-2)
        want = torch.cat((r, x3[..., rot:]), -1).view(t, heads * d)
        torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)


@settings(max_examples=8, deadline=None)
@given(t=st.integers(1, 5), h=st.sampled_from([8, 32]), seed=st.integers(0, 999))
def test_rmsnorm_and_silu(t, h, seed):
    with scope():
        norm, act = RMSNorm(h, eps=1e-5, prefix="n"), SiluAndMul(prefix="a")
    g = torch.Generator().manual_seed(seed)
    x, res = torch.randn(t, h, generator=g), torch.randn(t, h, generator=g)
    w = norm.weight.double()
    ref = lambda v: v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * w  # noqa: E731
    torch.testing.assert_close(norm(x).double(), ref(x.double()), atol=1e-5, rtol=1e-5)
    out, new_res = norm(x, res)
    torch.testing.assert_close(new_res.double(), x.double() + res.double(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.double(), ref(x.double() + res.double()), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(norm.weight, torch.ones(h))  # a dropped weight would be visible
    torch.testing.assert_close(act(x).double(), F.silu(x.double()[:, : h // 2]) * x.double()[:, h // 2 :], atol=1e-6, rtol=1e-6)


@settings(max_examples=8, deadline=None)
@given(t=st.integers(1, 5), k=st.sampled_from([16, 32]), n=st.sampled_from([8, 24]), seed=st.integers(0, 999))
def test_fp8_linear_matches_dequantised_product(t, k, n, seed):
    with scope():
        layer = ReplicatedLinear(k, n, bias=True, quant_config=Fp8Config(activation_absmax=4.0), prefix="l")
    assert layer.weight.dtype == FP8_DTYPE and layer.weight_scale.numel() == 1 and layer.input_scale.numel() == 1
    # static scales: the weight's absmax maps to 448; the input scale from the calibration constant
    assert float(layer.input_scale) == pytest.approx(4.0 / FP8_MAX)
    deq_w = layer.weight.double() * layer.weight_scale.double()
    assert deq_w.abs().max() == pytest.approx(FP8_MAX * float(layer.weight_scale), rel=1e-6)
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(seed))
    s = layer.input_scale.double()
    xq = (x.double() / s).clamp(-FP8_MAX, FP8_MAX).float().to(FP8_DTYPE).double() * s
    torch.testing.assert_close(layer(x).double(), xq @ deq_w.t() + layer.bias.double(), atol=1e-4, rtol=1e-4)


def test_weights_depend_on_seed_and_prefix_not_order():
    with scope(), init_seed_scope(1):
        a = ReplicatedLinear(4, 4, prefix="x")
        b = ReplicatedLinear(4, 4, prefix="y")
    with scope(), init_seed_scope(1):
        b2 = ReplicatedLinear(4, 4, prefix="y")
        a2 = ReplicatedLinear(4, 4, prefix="x")
    with scope(), init_seed_scope(2):
        a3 = ReplicatedLinear(4, 4, prefix="x")
    assert torch.equal(a.weight, a2.weight) and torch.equal(b.weight, b2.weight)
    assert not torch.equal(a.weight, b.weight) and not torch.equal(a.weight, a3.weight)


@settings(max_examples=6, deadline=None)
@given(vocab=st.integers(5, 150), seed=st.integers(0, 999))
def test_embedding_lm_head_logits(vocab, seed):
    with scope():
        emb = VocabParallelEmbedding(vocab, 8, prefix="e")
        head = ParallelLMHead(vocab, 8, prefix="h")
        proc = LogitsProcessor(vocab, prefix="p")
    assert emb.num_embeddings_padded % 64 == 0 and emb.num_embeddings_padded >= vocab
    assert torch.count_nonzero(head.weight[vocab:]) == 0  # padding rows are zero
    ids = torch.randint(0, vocab, (7,), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(emb(ids), emb.weight[ids])
    h = torch.randn(7, 8, generator=torch.Generator().manual_seed(seed + 1))
    logits = proc(head, h)
    assert logits.shape == (7, vocab)
    torch.testing.assert_close(logits.double(), h.double() @ head.weight[:vocab].double().t(), atol=1e-5, rtol=1e-5)


@settings(max_examples=6, deadline=None)
@given(t=st.integers(1, 6), renorm=st.booleans(), shared=st.booleans(), seed=st.integers(0, 999))
def test_fused_moe_layer_token_by_token(t, renorm, shared, seed):
    with scope() as reg:
        extra = ReplicatedLinear(8, 8, prefix="shared") if shared else None
        moe = FusedMoE(4, 2, 8, 6, renorm, prefix="moe", shared_experts=extra)
    assert moe.w13_weight.shape == (4, 12, 8) and moe.w2_weight.shape == (4, 8, 6)
    g = torch.Generator().manual_seed(seed)
    x, logits = torch.randn(t, 8, generator=g), torch.randn(t, 4, generator=g)
    with set_forward_context(None, reg):
        got = moe(x, logits)
    want = torch.zeros(t, 8, dtype=torch.float64)
    probs = torch.softmax(logits.double(), -1)
    for i in range(t):
        w, ids = probs[i].topk(2)
        w = w / w.sum() if renorm else w
        for wi, e in zip(w, ids.tolist()):
            h = moe.w13_weight[e].double() @ x[i].double()
            want[i] += wi * (moe.w2_weight[e].double() @ (F.silu(h[:6]) * h[6:]))
    if shared:
        want += x.double() @ extra.weight.double().t()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@settings(max_examples=6, deadline=None)
@given(lens=st.lists(st.integers(1, 9), min_size=1, max_size=3), seed=st.integers(0, 999))
def test_attention_layer_prefill_matches_causal_sdpa(lens, seed):
    hq, hkv, d, bs = 4, 2, 8, 4
    with scope() as reg:
        attn = Attention(hq, d, d ** -0.5, hkv, prefix="a", cache=CacheConfig(num_blocks=16, block_size=bs))
    assert attn.kv_cache.shape == (2, 16, bs, hkv, d) and "kv_cache" not in dict(attn.named_buffers())
    tables, nxt = [], 0
    for n in lens:
        nb = -(-n // bs)
        tables.append(list(range(nxt, nxt + nb)))
        nxt += nb
    md = build_batch_metadata(lens, [0] * len(lens), tables, bs)
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    q, k, v = torch.randn(t, hq * d, generator=g), torch.randn(t, hkv * d, generator=g), torch.randn(t, hkv * d, generator=g)
    with set_forward_context(md, reg):
        out = attn(q, k, v)
    assert out.shape == (t, hq * d)
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        qh = q[sl].view(n, hq, d).transpose(0, 1)
        kh = k[sl].view(n, hkv, d).transpose(0, 1).repeat_interleave(hq // hkv, 0)
        vh = v[sl].view(n, hkv, d).transpose(0, 1).repeat_interleave(hq // hkv, 0)
        want = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=d ** -0.5)
        torch.testing.assert_close(out[sl].view(n, hq, d), want.transpose(0, 1), atol=1e-5, rtol=1e-5)
        start += n


def test_constructor_validation():
    with scope():
        with pytest.raises(ValueError, match="3 heads not a multiple of 2 KV heads"):
            QKVParallelLinear(8, 4, 3, 2, prefix="q")
        with pytest.raises(ValueError, match="num_heads a multiple of num_kv_heads"):
            Attention(3, 4, 0.5, 2, prefix="a")
        with pytest.raises(ValueError, match="rotary_dim must be even"):
            RotaryEmbedding(8, 3, prefix="r")
        with pytest.raises(ValueError, match="0 < top_k <= num_experts"):
            FusedMoE(2, 3, 8, 4, prefix="m")
        with pytest.raises(ValueError, match="sizes must be positive"):
            RowParallelLinear(0, 4, prefix="row")
    with pytest.raises(ValueError, match="num_blocks > 0 and block_size > 0"):
        CacheConfig(num_blocks=0)
    with pytest.raises(ValueError, match="activation_absmax must be > 0"):
        Fp8Config(activation_absmax=0.0)
    with pytest.raises(TypeError, match="allowed: None or Fp8Config"):
        get_linear_method("fp8")
    with pytest.raises(TypeError, match="init seed must be an int"):
        with init_seed_scope("1"):
            pass
    assert math.isfinite(Fp8Config().activation_absmax)
