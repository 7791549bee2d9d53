"""PluggableLayer registries: in-tree and out-of-tree registration, and every registration error."""

from __future__ import annotations

import pytest
import torch

from layerpass.layers import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    PluggableLayer,
    QKVParallelLinear,
    RMSNorm,
    VocabParallelEmbedding,
    maybe_get_oot_by_class,
)
from layerpass.ops import LayerRegistry, layer_registry_scope


def test_every_in_tree_layer_is_registered():
    from layerpass.layers import in_tree_layers

    names = set(in_tree_layers())
    assert {"replicated_linear", "column_parallel_linear", "merged_column_parallel_linear", "qkv_parallel_linear",
            "row_parallel_linear", "vocab_parallel_embedding", "parallel_lm_head", "logits_processor", "rms_norm",
            "rotary_embedding", "silu_and_mul", "attention", "fused_moe"} <= names


class Identity(PluggableLayer):
    """A pluggable layer with a forward, subclassing no in-tree layer (registered by no one here)."""

    def forward(self, x):
        return x


def test_duplicate_in_tree_name_raises(clean_oot):
    with pytest.raises(ValueError, match="'rms_norm' is already registered in tree by RMSNorm"):
        PluggableLayer.register("rms_norm")(Identity)


def test_layer_without_forward_is_rejected_at_registration(clean_oot):
    class NoForward(PluggableLayer):
        def forward_native(self, x):
            return x

    with pytest.raises(TypeError, match="NoForward.*defines no forward"):
        PluggableLayer.register("test_no_forward")(NoForward)
    # a forward inherited from an in-tree base counts
    class Sub(RMSNorm):
        pass

    assert PluggableLayer.register("test_sub_norm")(Sub) is Sub


def test_register_requires_pluggable_subclass(clean_oot):
    with pytest.raises(TypeError, match="decorates PluggableLayer subclasses"):
        PluggableLayer.register("test_not_layer")(torch.nn.Linear)


def test_oot_must_subclass_in_tree(clean_oot):
    with pytest.raises(TypeError, match="Identity.*QKVParallelLinear"):
        QKVParallelLinear.register_oot(Identity)
    # a sibling in-tree layer is not a replacement either
    with pytest.raises(TypeError, match="must be a subclass"):
        QKVParallelLinear.register_oot(MergedColumnParallelLinear)


def test_oot_unknown_name_and_plain_base(clean_oot):
    class Mine(RMSNorm):
        pass

    with pytest.raises(KeyError, match="no in-tree layer named 'nope'"):
        PluggableLayer.register_oot(Mine, name="nope")
    with pytest.raises(ValueError, match="pass name="):
        PluggableLayer.register_oot(Mine)


def test_second_oot_needs_replace(clean_oot):
    @RMSNorm.register_oot
    class First(RMSNorm):
        pass

    class Second(RMSNorm):
        pass

    with pytest.raises(ValueError, match="already has an out-of-tree replacement .*First; pass replace=True"):
        RMSNorm.register_oot(Second)
    RMSNorm.register_oot(First)  # re-registering the same class is a no-op
    RMSNorm.register_oot(Second, replace=True)
    assert maybe_get_oot_by_class(RMSNorm) is Second
    assert RMSNorm.unregister_oot() is Second
    assert maybe_get_oot_by_class(RMSNorm) is RMSNorm


def test_decorator_forms_and_init_runs_once(clean_oot):
    calls = []

    @PluggableLayer.register_oot(name="rms_norm")
    class CountingNorm(RMSNorm):
        def __init__(self, *args, **kwargs):
            calls.append(type(self))
            super().__init__(*args, **kwargs)

    with layer_registry_scope(LayerRegistry()) as reg:
        norm = RMSNorm(8, prefix="n")
    assert type(norm) is CountingNorm and calls == [CountingNorm]
    assert reg.get("n") is norm  # registered once, under its prefix
    # direct construction of the OOT class works as usual
    with layer_registry_scope(LayerRegistry()):
        CountingNorm(8, prefix="n")
    assert calls == [CountingNorm, CountingNorm]


def test_oot_applies_only_to_its_own_name(clean_oot):
    @VocabParallelEmbedding.register_oot
    class MyEmbedding(VocabParallelEmbedding):
        pass

    @ColumnParallelLinear.register_oot(name="column_parallel_linear")
    class MyColumn(ColumnParallelLinear):
        pass

    with layer_registry_scope(LayerRegistry()):
        assert type(VocabParallelEmbedding(10, 4, prefix="e")) is MyEmbedding
        assert type(ParallelLMHead(10, 4, prefix="h")) is ParallelLMHead  # registered subclass keeps its own entry
        assert type(ColumnParallelLinear(4, 8, prefix="c")) is MyColumn
        assert type(MergedColumnParallelLinear(4, [4, 4], prefix="m")) is MergedColumnParallelLinear
    assert maybe_get_oot_by_class(MyEmbedding) is MyEmbedding
    assert maybe_get_oot_by_class(torch.nn.Linear) is torch.nn.Linear


def test_in_tree_class_cannot_be_an_oot(clean_oot):
    with pytest.raises(TypeError, match="itself an in-tree layer"):
        VocabParallelEmbedding.register_oot(ParallelLMHead)


def test_prefix_required_and_unique():
    with layer_registry_scope(LayerRegistry()):
        with pytest.raises(ValueError, match="non-empty str prefix"):
            RMSNorm(8)
        first = RMSNorm(8, prefix="x")  # the registry holds layers weakly: keep it alive
        from layerpass.ops import DuplicateLayerError

        with pytest.raises(DuplicateLayerError, match="'x' is already registered"):
            RMSNorm(8, prefix="x")
        assert first.prefix == "x"
