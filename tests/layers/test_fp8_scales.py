"""FP8 scales are checked where they enter a layer: construction and ``load_state_dict``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from layerpass.layers import FusedMoE, ReplicatedLinear, RowParallelLinear
from layerpass.layers.linear_methods import Fp8Config, Fp8LinearMethod
from layerpass.ops import LayerRegistry, layer_registry_scope

BAD = [0.0, -1.0, float("nan"), float("inf"), float("-inf")]


def scope():
    return layer_registry_scope(LayerRegistry())


@pytest.mark.parametrize("bad", BAD)
def test_fp8_config_rejects_bad_activation_absmax(bad: float) -> None:
    with pytest.raises(ValueError, match=r"Fp8Config\.activation_absmax must be > 0 and finite"):
        Fp8Config(activation_absmax=bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_linear_weight_scale_from_a_broken_weight(bad: float) -> None:
    """A NaN / inf weight gives a NaN / inf weight scale: caught at construction, naming the layer."""
    layer = nn.Module()
    layer.prefix = "model.layers.0.mlp.down_proj"
    weight = torch.randn(4, 8)
    weight[1, 2] = bad
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.down_proj'.*weight_scale must be finite and > 0"):
        Fp8LinearMethod(Fp8Config()).create_weights(layer, weight, float(weight.abs().max()), torch.float32)


def fp8_linear() -> nn.Module:
    with scope():
        return RowParallelLinear(8, 4, bias=False, quant_config=Fp8Config(), prefix="model.layers.3.self_attn.o_proj")


@pytest.mark.parametrize("param", ["input_scale", "weight_scale"])
@pytest.mark.parametrize("bad", BAD)
def test_linear_load_state_dict_rejects_bad_scales(param: str, bad: float) -> None:
    """Before: ``load_state_dict`` took any scale; the layer then saturated, flipped signs or gave NaN."""
    layer = fp8_linear()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    sd = layer.state_dict()
    sd[param] = torch.tensor([bad])
    with pytest.raises(ValueError, match=rf"'model\.layers\.3\.self_attn\.o_proj'.*{param} must be finite and > 0"):
        layer.load_state_dict(sd)
    for k, v in layer.state_dict().items():  # nothing was loaded
        assert torch.equal(v.view(torch.uint8) if v.dtype.itemsize == 1 else v, 
                           before[k].view(torch.uint8) if v.dtype.itemsize == 1 else before[k]), k


def test_scales_checked_when_loading_a_whole_model() -> None:
    with scope():
        model = nn.Sequential(ReplicatedLinear(8, 8, quant_config=Fp8Config(), prefix="a"),
                              ReplicatedLinear(8, 8, quant_config=Fp8Config(), prefix="b"))
    sd = model.state_dict()
    sd["1.input_scale"] = torch.tensor([0.0])
    with pytest.raises(ValueError, match=r"layer 'b': input_scale"):
        model.load_state_dict(sd)
    sd["1.input_scale"] = torch.tensor([0.5])
    model.load_state_dict(sd)  # a good scale loads
    assert float(model[1].input_scale) == 0.5


@settings(max_examples=20, deadline=None)
@given(value=st.floats(allow_nan=True, allow_infinity=True, width=32))
def test_loaded_scale_accepted_iff_finite_and_positive(value: float) -> None:
    layer = fp8_linear()
    sd = layer.state_dict()
    sd["input_scale"] = torch.tensor([value])
    if value > 0 and value != float("inf"):
        layer.load_state_dict(sd)
    else:
        with pytest.raises(ValueError, match=r"input_scale must be finite and > 0"):
            layer.load_state_dict(sd)


def fp8_moe() -> FusedMoE:
    with scope():
        return FusedMoE(4, 2, 8, 6, prefix="model.layers.1.mlp.experts", quant_config=Fp8Config())


@pytest.mark.parametrize("param", ["w13_scale", "w2_scale", "input_scale"])
@pytest.mark.parametrize("bad", [0.0, -2.0, float("nan")])
def test_fused_moe_load_state_dict_rejects_bad_scales(param: str, bad: float) -> None:
    moe = fp8_moe()
    sd = moe.state_dict()
    sd[param] = torch.tensor([bad])
    with pytest.raises(ValueError, match=rf"'model\.layers\.1\.mlp\.experts'.*{param} must be finite and > 0"):
        moe.load_state_dict(sd)


def test_fused_moe_construction_rejects_broken_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    import layerpass.layers.fused_moe as fm

    real = fm.init_normal
    monkeypatch.setattr(fm, "init_normal", lambda prefix, name, shape, std: real(prefix, name, shape, std) * float("nan"))
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.experts'.*w13_scale must be finite and > 0"):
        fp8_moe()


def test_unquantised_layers_load_as_before() -> None:
    with scope():
        layer = ReplicatedLinear(8, 4, prefix="u")
    layer.load_state_dict(layer.state_dict())


def test_guarded_layer_still_pickles_and_copies() -> None:
    import copy
    import pickle

    layer = fp8_linear()
    clone = copy.deepcopy(layer)
    sd = clone.state_dict()
    sd["input_scale"] = torch.tensor([0.0])
    with pytest.raises(ValueError, match=r"input_scale must be finite"):
        clone.load_state_dict(sd)
    hooks = list(layer._load_state_dict_pre_hooks.values())
    assert hooks and all(pickle.loads(pickle.dumps(h.hook)).names == h.hook.names for h in hooks)  # no closures
