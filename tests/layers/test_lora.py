"""LoRA wrappers: numerics against an explicit ``W x + s B A x`` per packed slice, apply_lora,
can_replace_layer decisions, and adapter-loading errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from layerpass.layers import (
    ColumnParallelLinear,
    ColumnParallelLinearWithLoRA,
    FusedMoE,
    FusedMoE3DWithLoRA,
    FusedMoEWithLoRA,
    LoRAConfig,
    MergedColumnParallelLinear,
    MergedColumnParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
    QKVParallelLinear,
    QKVParallelLinearWithLoRA,
    RowParallelLinear,
    RowParallelLinearWithLoRA,
    apply_lora,
)
from layerpass.models import build_model, make_step
from layerpass.ops import LayerRegistry, layer_registry_scope, set_forward_context


def _wrap(cls, base, rank: int, seed: int, alpha: float = 8.0):
    wrapper = cls(base)
    wrapper.create_lora_weights(LoRAConfig(max_lora_rank=rank, lora_alpha=alpha))
    adapters = wrapper.random_lora(seed)
    wrapper.set_lora(adapters)
    return wrapper, {k: (a.double(), b.double()) for k, (a, b) in adapters.items()}, alpha / rank


def _slice_ref(x, w, a, b, s):
    """``W x + s B A x`` for one slice, float64."""
    return x @ w.t() + s * (x @ a.t()) @ b.t()


shapes = st.fixed_dictionaries({
    "tokens": st.integers(1, 6), "k": st.sampled_from([8, 16]), "rank": st.sampled_from([1, 4]),
    "seed": st.integers(0, 1000),
})


@settings(max_examples=10, deadline=None)
@given(p=shapes, outs=st.lists(st.sampled_from([4, 8, 12]), min_size=1, max_size=3))
def test_column_wrappers_match_explicit_reference(p, outs):
    with layer_registry_scope(LayerRegistry()):
        if len(outs) == 1:
            base, cls = ColumnParallelLinear(p["k"], outs[0], bias=True, prefix="c"), ColumnParallelLinearWithLoRA
        else:
            base, cls = MergedColumnParallelLinear(p["k"], outs, prefix="m"), MergedColumnParallelLinearWithLoRA
    wrapper, ad, s = _wrap(cls, base, p["rank"], p["seed"])
    x = torch.randn(p["tokens"], p["k"], generator=torch.Generator().manual_seed(p["seed"]))
    xd, w = x.double(), base.weight.double()
    rows = w.split(outs)
    names = ["out"] if len(outs) == 1 else [str(i) for i in range(len(outs))]
    want = torch.cat([_slice_ref(xd, rows[i], *ad[n], s) for i, n in enumerate(names)], -1)
    if base.bias is not None:
        want = want + base.bias.double()
    torch.testing.assert_close(wrapper(x).double(), want, atol=1e-5, rtol=1e-5)


@settings(max_examples=8, deadline=None)
@given(p=shapes, heads=st.sampled_from([(4, 2), (2, 2), (4, 1)]), packed=st.sampled_from([1, 3]))
def test_qkv_wrappers_match_explicit_reference(p, heads, packed):
    hq, hkv, d = heads[0], heads[1], 4
    with layer_registry_scope(LayerRegistry()):
        base = QKVParallelLinear(p["k"], d, hq, hkv, prefix="qkv")
    cls = QKVParallelLinearWithLoRA if packed == 1 else MergedQKVParallelLinearWithLoRA
    assert cls.can_replace_layer(base, LoRAConfig(), ["x"] * packed)
    wrapper, ad, s = _wrap(cls, base, p["rank"], p["seed"])
    x = torch.randn(p["tokens"], p["k"], generator=torch.Generator().manual_seed(p["seed"]))
    xd, w = x.double(), base.weight.double()
    if packed == 1:
        want = _slice_ref(xd, w, *ad["out"], s)
    else:
        wq, wk, wv = w.split([hq * d, hkv * d, hkv * d])
        want = torch.cat([_slice_ref(xd, wq, *ad["q"], s), _slice_ref(xd, wk, *ad["k"], s), _slice_ref(xd, wv, *ad["v"], s)], -1)
    torch.testing.assert_close(wrapper(x).double(), want, atol=1e-5, rtol=1e-5)


@settings(max_examples=8, deadline=None)
@given(p=shapes, n=st.sampled_from([4, 8]))
def test_row_wrapper_matches_explicit_reference(p, n):
    with layer_registry_scope(LayerRegistry()):
        base = RowParallelLinear(p["k"], n, bias=True, prefix="r")
    wrapper, ad, s = _wrap(RowParallelLinearWithLoRA, base, p["rank"], p["seed"])
    x = torch.randn(p["tokens"], p["k"], generator=torch.Generator().manual_seed(p["seed"]))
    want = _slice_ref(x.double(), base.weight.double(), *ad["out"], s) + base.bias.double()
    torch.testing.assert_close(wrapper(x).double(), want, atol=1e-5, rtol=1e-5)


def _moe_reference(base: FusedMoE, ad, s, x, logits, three_d: bool):
    """Token by token: softmax top-k routing, each expert's adapted gate/up/down in float64."""
    i = base.intermediate_size
    out = torch.zeros(x.shape, dtype=torch.float64)
    probs = torch.softmax(logits.double(), -1)
    for t in range(x.shape[0]):
        w, ids = probs[t].topk(base.top_k)
        if base.renormalize:
            w = w / w.sum()
        xt = x[t].double()
        for wi, e in zip(w, ids.tolist()):
            w13 = base.w13_weight[e].double()
            if three_d:
                a, b = ad["w13"]
                h = w13 @ xt + s * b[e] @ (a[e] @ xt)
                g, u = h[:i], h[i:]
            else:
                g = w13[:i] @ xt + s * ad["w1"][1][e] @ (ad["w1"][0][e] @ xt)
                u = w13[i:] @ xt + s * ad["w3"][1][e] @ (ad["w3"][0][e] @ xt)
            act = F.silu(g) * u
            out[t] += wi * (base.w2_weight[e].double() @ act + s * ad["w2"][1][e] @ (ad["w2"][0][e] @ act))
    return out


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 1000), tokens=st.integers(1, 7), three_d=st.booleans(), renorm=st.booleans())
def test_moe_wrappers_match_explicit_reference(seed, tokens, three_d, renorm):
    with layer_registry_scope(LayerRegistry()) as registry:
        base = FusedMoE(4, 2, 8, 6, renorm, prefix="moe")
    cls = FusedMoE3DWithLoRA if three_d else FusedMoEWithLoRA
    wrapper, ad, s = _wrap(cls, base, 2, seed)
    g = torch.Generator().manual_seed(seed)
    x, logits = torch.randn(tokens, 8, generator=g), torch.randn(tokens, 4, generator=g)
    want = _moe_reference(base, ad, s, x, logits, three_d)
    torch.testing.assert_close(wrapper(x, logits).double(), want, atol=1e-5, rtol=1e-5)
    wrapper.reset_lora()  # zero adapters: exactly the base layer's op
    with set_forward_context(None, registry):
        torch.testing.assert_close(wrapper(x, logits), base(x, logits), atol=1e-6, rtol=1e-6)


def test_can_replace_layer_decisions():
    cfg = LoRAConfig()
    with layer_registry_scope(LayerRegistry()):
        col = ColumnParallelLinear(8, 8, prefix="c")
        gathered = ColumnParallelLinear(8, 8, gather_output=True, prefix="g")
        merged = MergedColumnParallelLinear(8, [4, 4], prefix="m")
        qkv = QKVParallelLinear(8, 4, 2, 1, prefix="q")
        moe = FusedMoE(4, 2, 8, 4, True, prefix="e")
    assert ColumnParallelLinearWithLoRA.can_replace_layer(col, cfg, ["c"])
    assert not ColumnParallelLinearWithLoRA.can_replace_layer(gathered, cfg, ["g"])
    assert not ColumnParallelLinearWithLoRA.can_replace_layer(merged, cfg, ["m"])  # exact type
    assert MergedColumnParallelLinearWithLoRA.can_replace_layer(merged, cfg, ["a", "b"])
    assert not MergedColumnParallelLinearWithLoRA.can_replace_layer(qkv, cfg, ["a", "b"])
    assert QKVParallelLinearWithLoRA.can_replace_layer(qkv, cfg, ["qkv"])
    assert not QKVParallelLinearWithLoRA.can_replace_layer(qkv, cfg, ["q", "k", "v"])
    assert MergedQKVParallelLinearWithLoRA.can_replace_layer(qkv, cfg, ["q", "k", "v"])
    assert not MergedQKVParallelLinearWithLoRA.can_replace_layer(qkv, cfg, ["q", "k"])
    assert FusedMoEWithLoRA.can_replace_layer(moe, cfg, ["w1", "w3"]) and not FusedMoEWithLoRA.can_replace_layer(moe, cfg, ["w"])
    assert FusedMoE3DWithLoRA.can_replace_layer(moe, cfg, ["w13"]) and not FusedMoE3DWithLoRA.can_replace_layer(moe, cfg, ["a", "b"])


def test_set_lora_errors():
    with layer_registry_scope(LayerRegistry()):
        base = MergedColumnParallelLinear(8, [4, 4], prefix="m")
    wrapper = MergedColumnParallelLinearWithLoRA(base)
    with pytest.raises(RuntimeError, match="create_lora_weights first"):
        wrapper.set_lora({})
    wrapper.create_lora_weights(LoRAConfig(max_lora_rank=2))
    with pytest.raises(ValueError, match=r"slices \['0', '1'\] needed, got \['0'\]"):
        wrapper.set_lora({"0": (torch.zeros(2, 8), torch.zeros(4, 2))})
    with pytest.raises(ValueError, match=r"slice '1': A must be \(2, 8\) and B \(4, 2\), got \(2, 8\) and \(5, 2\)"):
        wrapper.set_lora({"0": (torch.zeros(2, 8), torch.zeros(4, 2)), "1": (torch.zeros(2, 8), torch.zeros(5, 2))})
    with pytest.raises(ValueError, match="max_lora_rank must be a positive int"):
        LoRAConfig(max_lora_rank=0)
    with pytest.raises(TypeError, match="needs a LoRAConfig"):
        apply_lora(torch.nn.Linear(2, 2), {"rank": 2})


@pytest.mark.parametrize("name,mapping,expect", [
    ("llama", None, {"qkv_proj": MergedQKVParallelLinearWithLoRA, "gate_up_proj": MergedColumnParallelLinearWithLoRA}),
    ("llama", {"qkv_proj": ["qkv_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}, {"qkv_proj": QKVParallelLinearWithLoRA}),
    ("moe", None, {"experts": FusedMoEWithLoRA, "down_proj": RowParallelLinearWithLoRA}),
    ("moe", {"experts": ["gate_up_proj"], "qkv_proj": ["q", "k", "v"], "gate_up_proj": ["g", "u"]},
     {"experts": FusedMoE3DWithLoRA}),
])
def test_apply_lora_on_models(name, mapping, expect):
    model = build_model(name, num_layers=2, seed=1)
    step = make_step(model, num_decodes=2, prefill_lens=[3], seed=0)
    base_logits = step.run()
    wrapped = apply_lora(model, LoRAConfig(max_lora_rank=4), packed_modules_mapping=mapping)
    by_last = {}
    for qual, w in wrapped.items():
        by_last.setdefault(qual.rpartition(".")[2], set()).add(type(w))
        assert model.get_submodule(qual) is w
    for last, cls in expect.items():
        assert by_last[last] == {cls}
    assert "o_proj" in by_last and "lm_head" not in by_last and "gate" not in by_last  # replicated router untouched
    torch.testing.assert_close(step.run(), base_logits, atol=1e-6, rtol=1e-6)  # zero B: no change
    for w in wrapped.values():
        w.set_lora(w.random_lora(7))
    assert not torch.allclose(step.run(), base_logits, atol=1e-3)
    target_only = apply_lora(build_model(name, num_layers=1), LoRAConfig(target_modules=("o_proj",)))
    assert set(q.rpartition(".")[2] for q in target_only) == {"o_proj"}
