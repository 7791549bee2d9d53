"""``LayerName``: a value-type opaque object that torch.compile hoists to a graph input."""

from __future__ import annotations

import copy
import pickle
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import layerpass.ops  # noqa: F401  (registers the ops)
from layerpass.envs import HAS_OPAQUE_TYPE, USE_LAYERNAME
from layerpass.torch_compat import is_hoisted_constant
from layerpass.ops import LayerName, LayerNameType, encode_layer_name, op_overload, resolve_layer_name
from layerpass.ops.library import schema_of

names = st.text(min_size=0, max_size=40)
LAYER_NAME_OPS = ("unified_attention_with_output", "moe_forward", "moe_forward_shared")


@settings(max_examples=50, deadline=None)
@given(names, names)
def test_value_semantics(a: str, b: str) -> None:
    assert LayerName(a) == LayerName(a) and hash(LayerName(a)) == hash(LayerName(a))
    assert (LayerName(a) == LayerName(b)) == (a == b)
    assert LayerName(a) != a  # a LayerName is not its string
    assert LayerName(a).value == a
    assert len({LayerName(a), LayerName(a), LayerName(b)}) == (1 if a == b else 2)


@settings(max_examples=50, deadline=None)
@given(names)
def test_reprs_round_trip(name: str) -> None:
    """``__fx_repr__`` is what FX codegen prints for a constant: it must evaluate back."""
    source, globals_ = LayerName(name).__fx_repr__()
    assert globals_ == {"LayerName": LayerName}
    assert eval(source, dict(globals_)) == LayerName(name)
    assert eval(repr(LayerName(name)), {"LayerName": LayerName}) == LayerName(name)
    assert repr(LayerName("model.layers.3.attn")) == "LayerName('model.layers.3.attn')"


def test_copy_pickle_and_weakref() -> None:
    name = LayerName("model.layers.0.attn")
    assert copy.deepcopy(name) == name and pickle.loads(pickle.dumps(name)) == name
    # proxy tracing (make_fx / AOTAutograd / opcheck) keeps weak references to inputs
    assert weakref.ref(name)() is name


@pytest.mark.parametrize("bad", [3, None, b"bytes", LayerName("x")])
def test_rejects_non_str(bad) -> None:
    with pytest.raises(TypeError, match="LayerName takes a str"):
        LayerName(bad)


@pytest.mark.skipif(not HAS_OPAQUE_TYPE, reason="torch without hoistable opaque types")
def test_registered_as_hoisted_value_type() -> None:
    assert is_hoisted_constant(LayerName)


def test_encode_and_resolve() -> None:
    encoded = encode_layer_name("model.layers.1.mlp")
    if USE_LAYERNAME:
        assert LayerNameType is LayerName and encoded == LayerName("model.layers.1.mlp")
    else:
        assert LayerNameType is str and encoded == "model.layers.1.mlp"
    assert resolve_layer_name(encoded) == "model.layers.1.mlp"
    assert resolve_layer_name("plain") == "plain" and resolve_layer_name(LayerName("boxed")) == "boxed"
    with pytest.raises(TypeError, match="LayerName or str"):
        resolve_layer_name(3)  # type: ignore[arg-type]


@pytest.mark.parametrize("op_name", LAYER_NAME_OPS)
def test_schema_layer_name_type_follows_switch(op_name: str) -> None:
    """The schema is built from ``LayerNameType``: an opaque (non-str) arg when on, ``str`` when off."""
    (arg,) = [a for a in schema_of(op_overload(op_name)).arguments if a.name == "layer_name"]
    is_str = isinstance(arg.type, torch._C.StringType)
    assert is_str == (not USE_LAYERNAME), str(arg.type)
