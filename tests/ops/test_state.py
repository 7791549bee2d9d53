"""Per-model ``LayerRegistry``: unique prefixes, close-name errors, scoping, and two models
with the same prefixes running side by side in one process."""

from __future__ import annotations

import gc
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tests.helpers import reference as ref
from layerpass.ops import (
    DEFAULT_REGISTRY,
    DuplicateLayerError,
    LayerName,
    LayerNotFoundError,
    LayerRegistry,
    build_batch_metadata,
    current_registry,
    encode_layer_name,
    layer_registry_scope,
    lookup_layer,
    set_forward_context,
)

ops = torch.ops.layerpass


def prefixes(n: int) -> list[str]:
    return [f"model.layers.{i}.self_attn.attn" for i in range(n)]


def test_register_and_get_by_str_or_layer_name() -> None:
    reg, layers = LayerRegistry("m"), [nn.Identity() for _ in range(3)]
    for p, layer in zip(prefixes(3), layers):
        reg.register(p, layer)
    assert len(reg) == 3 and sorted(reg.names()) == sorted(prefixes(3))
    for p, layer in zip(prefixes(3), layers):
        assert reg.get(p) is layer and reg.get(LayerName(p)) is layer
        assert p in reg and LayerName(p) in reg
    assert "model.layers.9.self_attn.attn" not in reg and 3 not in reg
    reg.register(prefixes(3)[0], layers[0])  # the same layer again is harmless
    reg.unregister(prefixes(3)[0])
    assert prefixes(3)[0] not in reg and len(reg) == 2


def test_duplicate_prefix_raises() -> None:
    reg, first = LayerRegistry("llama"), nn.Identity()  # held: the registry only keeps weak refs
    reg.register("model.layers.0.mlp", first)
    with pytest.raises(DuplicateLayerError, match=r"'model.layers.0.mlp' is already registered in registry 'llama'"):
        reg.register("model.layers.0.mlp", nn.Linear(1, 1))


def test_layers_with_tensor_follows_the_registry() -> None:
    """Which layers hold a cache is remembered per registry version, and a dropped layer is gone."""
    reg, cached, plain = LayerRegistry("m"), nn.Module(), nn.Identity()
    cached.kv_cache = torch.zeros(1)
    reg.register("b.attn", cached)
    reg.register("a.mlp", plain)
    assert reg.layers_with_tensor(("kv_cache",)) == [("b.attn", cached)]
    plain.kv_cache = torch.zeros(1)  # no registry change: the remembered answer stands
    assert reg.layers_with_tensor(("kv_cache",)) == [("b.attn", cached)]
    reg.register("c.attn", nn.Identity())  # a change: asked again, in name order
    assert reg.layers_with_tensor(("kv_cache",)) == [("a.mlp", plain), ("b.attn", cached)]
    del cached
    gc.collect()
    assert reg.layers_with_tensor(("kv_cache",)) == [("a.mlp", plain)]


@pytest.mark.parametrize("bad", ["", None, 3, LayerName("x")])
def test_bad_prefix_raises(bad) -> None:
    with pytest.raises(ValueError, match="non-empty str"):
        LayerRegistry().register(bad, nn.Identity())


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 11), st.sampled_from(["atn", "attn_", "att", "Attn"]))
def test_unknown_name_lists_closest(index: int, typo: str) -> None:
    reg = LayerRegistry("m")
    keep = [nn.Identity() for _ in range(12)]
    for p, layer in zip(prefixes(12), keep):
        reg.register(p, layer)
    wrong = f"model.layers.{index}.self_attn.{typo}"
    with pytest.raises(LayerNotFoundError) as info:
        reg.get(encode_layer_name(wrong))
    err = info.value
    assert isinstance(err, KeyError)  # `except KeyError` still catches it
    assert err.name == wrong and err.closest and err.closest[0] == prefixes(12)[index]
    assert wrong in str(err) and prefixes(12)[index] in str(err) and "'m'" in str(err)
    assert not str(err).startswith('"')  # readable, not KeyError's repr


def test_unknown_name_in_empty_registry() -> None:
    with pytest.raises(LayerNotFoundError, match="0 layers registered"):
        LayerRegistry("empty").get("model.layers.0")


def test_dropped_model_frees_its_names() -> None:
    reg = LayerRegistry()
    reg.register("a", nn.Identity())  # nothing else holds it
    gc.collect()
    assert "a" not in reg and len(reg) == 0
    reg.register("a", nn.Identity())  # the prefix is free again


def test_registry_scope_nests_and_restores() -> None:
    assert current_registry() is DEFAULT_REGISTRY
    with layer_registry_scope() as outer:
        assert current_registry() is outer and outer is not DEFAULT_REGISTRY
        mine = LayerRegistry("mine")
        with layer_registry_scope(mine) as inner:
            assert inner is mine and current_registry() is mine
        assert current_registry() is outer
    assert current_registry() is DEFAULT_REGISTRY


def test_lookup_prefers_the_step_registry() -> None:
    a, b = LayerRegistry("a"), LayerRegistry("b")
    la, lb = nn.Identity(), nn.Identity()
    a.register("x", la)
    b.register("x", lb)
    with layer_registry_scope(a):
        assert lookup_layer("x") is la  # no forward context: the construction scope
        with set_forward_context(None, b):
            assert lookup_layer(LayerName("x")) is lb
        with set_forward_context(None, None):
            assert lookup_layer("x") is la  # a context without a registry falls back


def test_scope_is_per_thread() -> None:
    seen = []
    with layer_registry_scope():
        thread = threading.Thread(target=lambda: seen.append(current_registry()))
        thread.start()
        thread.join()
    assert seen == [DEFAULT_REGISTRY]


def build_attn_model(seed: int) -> tuple[LayerRegistry, list[ref.AttnLayer]]:
    """Two layers with the prefixes every copy of this model uses."""
    torch.manual_seed(seed)
    with layer_registry_scope(LayerRegistry(f"model-{seed}")) as reg:
        layers = [ref.AttnLayer(p, num_blocks=4, block_size=4, num_kv_heads=1, head_size=8) for p in prefixes(2)]
        for layer in layers:
            current_registry().register(layer.prefix, layer)
            layer.kv_cache.normal_()
    return reg, layers


def test_two_models_with_same_prefixes_do_not_collide() -> None:
    """Each step's forward context names its model's registry, so the same layer name
    reaches each model's own KV cache (and only that one is written)."""
    (reg1, layers1), (reg2, layers2) = build_attn_model(1), build_attn_model(2)
    md = build_batch_metadata([1, 3], [5, 0], [[0, 1], [2]], block_size=4)
    q, kv = torch.randn(4, 2, 8), torch.randn(4, 1, 8)
    caches2_before = [layer.kv_cache.clone() for layer in layers2]
    history = {reg.label: ref.read_paged(layers[1].kv_cache, [0, 1], 5) for reg, layers in ((reg1, layers1), (reg2, layers2))}
    outs = {}
    for reg, layers in ((reg1, layers1), (reg2, layers2)):
        with set_forward_context(md, reg):
            out = torch.empty_like(q)
            ops.unified_attention_with_output(q, kv, kv, out, encode_layer_name(prefixes(2)[1]))
            outs[reg.label] = out
        if reg is reg1:  # model 1's step left model 2's caches alone
            assert all(torch.equal(c, layer.kv_cache) for c, layer in zip(caches2_before, layers2))
    for reg, layers in ((reg1, layers1), (reg2, layers2)):
        hist_k, hist_v = history[reg.label]  # decode request 0: 5 cached tokens + 1 new
        request0 = ref.Request(hist_k, hist_v, q[:1], kv[:1], kv[:1], [0, 1])
        expected = ref.attention([request0], layers[1].scale)
        torch.testing.assert_close(outs[reg.label][:1].double(), expected)
    assert not torch.allclose(outs["model-1"][:1], outs["model-2"][:1])
    # the layer at prefix 0 of either model was never touched
    assert reg1.get(prefixes(2)[0]) is layers1[0] and reg2.get(prefixes(2)[0]) is layers2[0]


def test_two_moe_models_with_same_prefix() -> None:
    regs, layers = [], []
    for seed in (3, 4):
        torch.manual_seed(seed)
        with layer_registry_scope(LayerRegistry(f"moe-{seed}")) as reg:
            layer = ref.MoELayer("model.layers.0.mlp.experts", 4, 6, 5, 2, True)
            reg.register(layer.prefix, layer)
        regs.append(reg)
        layers.append(layer)
    x, logits = torch.randn(3, 6), torch.randn(3, 4)
    for reg, layer in zip(regs, layers):
        with set_forward_context(None, reg):
            out = ops.moe_forward(x, logits, encode_layer_name("model.layers.0.mlp.experts"))
        expected = ref.moe(x, logits, layer.w13_weight, layer.w2_weight, 2, True)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------- outside set_forward_context
def test_lookup_outside_a_forward_context_says_so() -> None:
    """Before: ``LayerNotFoundError ... 0 layers registered``, which hides the real mistake."""
    with layer_registry_scope(LayerRegistry("empty")), pytest.raises(LayerNotFoundError) as info:
        lookup_layer("model.layers.0.self_attn.attn")
    msg = str(info.value)
    assert "no forward context is set" in msg and "set_forward_context(metadata, model.layer_registry)" in msg, msg
    assert "make_step" in msg, msg


def test_zoo_model_called_outside_a_forward_context() -> None:
    from layerpass.models import build_model

    model = build_model("llama", num_layers=1)
    ids = torch.tensor([1, 2, 3])
    with torch.no_grad(), pytest.raises(LayerNotFoundError, match=r"no forward context is set.*set_forward_context"):
        model(ids, torch.arange(3))


def test_unknown_name_inside_a_context_keeps_the_registry_hint() -> None:
    reg, mlp = LayerRegistry("m"), nn.Identity()  # registries hold layers weakly: keep it alive
    reg.register("model.layers.0.mlp", mlp)
    with set_forward_context(None, reg), pytest.raises(LayerNotFoundError) as info:
        lookup_layer("model.layers.0.mlq")
    assert "no forward context" not in str(info.value) and "model.layers.0.mlp" in str(info.value)


# ------------------------------------------------------------- a layer of the wrong kind
def test_moe_forward_with_an_attention_layer_name() -> None:
    """Before: ``AttributeError: 'AttnLayer' object has no attribute 'w13_weight'``."""
    reg = LayerRegistry("m")
    attn = ref.AttnLayer("model.layers.0.self_attn.attn", num_blocks=2, block_size=4, num_kv_heads=1, head_size=8)
    reg.register(attn.prefix, attn)
    x, logits = torch.randn(3, 6), torch.randn(3, 4)
    for op in (ops.moe_forward, ops.moe_forward_shared):
        with set_forward_context(None, reg), pytest.raises(
                ValueError, match=r"moe_forward.*'model\.layers\.0\.self_attn\.attn' is a AttnLayer.*w13_weight"):
            op(x, logits, encode_layer_name(attn.prefix))


def test_lookup_by_kind() -> None:
    reg, lin = LayerRegistry("m"), nn.Linear(2, 2)
    reg.register("a", lin)
    with set_forward_context(None, reg):
        assert isinstance(lookup_layer("a", needs=("weight", "bias"), op="some_op"), nn.Linear)
        with pytest.raises(ValueError, match=r"some_op: layer 'a' is a Linear, which has no 'w2_weight'"):
            lookup_layer("a", needs=("weight", "w2_weight"), op="some_op")


def test_attention_ops_with_another_kind_of_layer_name() -> None:
    """Before: the attention op read ``layer.kv_cache`` of an MoE layer (``AttributeError`` / "no KV cache"),
    and linear attention said its layer "needs a state_cache", never that the name is of another kind."""
    reg = LayerRegistry("m")
    moe = ref.MoELayer("model.layers.0.mlp.experts", 4, 6, 5, 2, True)
    attn = ref.AttnLayer("model.layers.1.self_attn.attn", num_blocks=2, block_size=4, num_kv_heads=1, head_size=8)
    for layer in (moe, attn):
        reg.register(layer.prefix, layer)
    q = torch.randn(3, 1, 8)
    with set_forward_context(None, reg), pytest.raises(
            ValueError, match=r"unified_attention_with_output: layer 'model\.layers\.0\.mlp\.experts' is a MoELayer.*"
                              r"'kv_cache'.*another kind of layer"):
        ops.unified_attention_with_output(q, q, q, torch.empty_like(q), encode_layer_name(moe.prefix))
    with set_forward_context(None, reg), pytest.raises(
            ValueError, match=r"linear_attention: layer 'model\.layers\.1\.self_attn\.attn' is a AttnLayer.*"
                              r"'state_cache'.*another kind of layer"):
        ops.linear_attention(q, q, q, torch.empty_like(q), encode_layer_name(attn.prefix))
