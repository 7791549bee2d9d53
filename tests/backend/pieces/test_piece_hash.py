"""``backend/pieces/piece_hash.py``: equal keys exactly when one compiled artifact serves both pieces.

- What counts: the op and argument structure, constants by value (numbers, ``str``, tensors by
  content), input metadata (shape, dtype), the bodies of higher-order ops (``checkpoint``,
  ``torch.cond``, ``flex_attention``), recursively, and a Python call target's code and closure.
- What does not: placeholder names, and a graph input that is an object (a hoisted ``LayerName``):
  it is described by type, the compiled code receives it at run time.
- ``shape_key`` masks ``str`` and opaque constants: equal ``shape_key``, different ``key`` means the
  pieces differ only in such constants (the doctor's question); those constants are reported.
- A value with no stable description makes the piece unshareable: a key of its own per object.

The graphs are built by hand (no Dynamo, no Inductor: cheap). Item 1 of issue 13: before, a
``get_attr`` of a non-tensor counted by its type only, so layers differing only inside a body shared.
"""

from __future__ import annotations

import operator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

from layerpass.backend.pieces.piece_hash import piece_signature, unshareable_token
from layerpass.ops import LayerName


# ============================================================== constants, inputs, ops
def _graph(const: str, scale: float, names: tuple[str, str]) -> fx.GraphModule:
    g = fx.Graph()
    a, b = g.placeholder(names[0]), g.placeholder(names[1])
    s = g.call_function(torch.add, (a, b), {"alpha": scale})
    t = g.call_function(torch.ops.aten.div.Tensor_mode, (s, a), {"rounding_mode": const})  # a str constant
    g.output((t,))
    return fx.GraphModule(nn.Module(), g)


@settings(max_examples=20, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    other=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_piece_hash_is_structural(shape, other, dtype) -> None:
    args = [torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)]
    base = piece_signature(_graph("floor", 1.0, ("x", "y")), args)
    # placeholder names never count
    assert piece_signature(_graph("floor", 1.0, ("p", "q")), args).key == base.key
    # a str constant counts in the key but not in the shape key, and is reported
    renamed = piece_signature(_graph("trunc", 1.0, ("x", "y")), args)
    assert renamed.key != base.key and renamed.shape_key == base.shape_key
    assert [c[2] for c in renamed.constants] == ["trunc"]
    # numeric constants, input shapes and dtypes count
    assert piece_signature(_graph("floor", 2.0, ("x", "y")), args).key != base.key
    other_args = [torch.empty(other, dtype=dtype), torch.empty(other, dtype=dtype)]
    assert (piece_signature(_graph("floor", 1.0, ("x", "y")), other_args).key == base.key) == (other == shape)
    f64 = [a.double() for a in args]
    assert piece_signature(_graph("floor", 1.0, ("x", "y")), f64).key != base.key


def test_piece_hash_rejects_wrong_arity() -> None:
    with pytest.raises(ValueError, match="2 inputs but 1 example"):
        piece_signature(_graph("floor", 1.0, ("x", "y")), [torch.empty(2)])


def _binary(op, x_name: str = "x") -> fx.GraphModule:
    g = fx.Graph()
    x, y = g.placeholder(x_name), g.placeholder("y")
    g.output((g.call_function(op, (x, y)),))
    return fx.GraphModule(nn.Module(), g)


def test_the_op_counts_and_an_identical_graph_gets_the_same_key() -> None:
    args = [torch.empty(3, 4), torch.empty(3, 4)]
    add = piece_signature(_binary(torch.ops.aten.add.Tensor), args)
    again = piece_signature(_binary(torch.ops.aten.add.Tensor, x_name="hidden"), args)
    assert (again.key, again.shape_key) == (add.key, add.shape_key)
    for other in (torch.ops.aten.sub.Tensor, torch.ops.aten.add.Scalar, torch.ops.aten.add):
        sig = piece_signature(_binary(other), args)
        assert sig.key != add.key and sig.shape_key != add.shape_key, other  # structure, not a constant
    assert add.constants == [] and add.unshareable == []


def test_an_object_input_counts_by_type_only() -> None:
    """A hoisted ``LayerName`` is a graph input: every layer's piece gets one key whatever its name."""
    g = fx.Graph()
    x, name = g.placeholder("x"), g.placeholder("layer_name")
    g.output((g.call_function(torch.ops.aten.relu.default, (x,)), name))
    gm = fx.GraphModule(nn.Module(), g)
    keys = {piece_signature(gm, [torch.empty(2, 3), LayerName(f"layers.{i}.attn")]).key for i in range(3)}
    assert len(keys) == 1
    assert piece_signature(gm, [torch.empty(2, 3), "layers.0.attn"]).key not in keys  # a str is not a LayerName


def test_a_layer_name_baked_in_as_a_constant_counts_by_value_in_the_key_only() -> None:
    """An opaque constant (``__fx_repr__``): like a ``str``, in the key, masked in the shape key."""
    def piece(name: str) -> fx.GraphModule:
        g = fx.Graph()
        x = g.placeholder("x")
        g.output((g.call_function(torch.ops.aten.relu.default, (x,)), g.call_function(repr, (LayerName(name),))))
        return fx.GraphModule(nn.Module(), g)

    a, b = (piece_signature(piece(n), [torch.empty(2)]) for n in ("layers.0", "layers.1"))
    assert a.key != b.key and a.shape_key == b.shape_key
    assert piece_signature(piece("layers.0"), [torch.empty(2)]).key == a.key


def test_unshareable_tokens_are_per_object() -> None:
    one, two = _Opaque(1.0), _Opaque(1.0)
    assert unshareable_token(one) == unshareable_token(one) != unshareable_token(two)


# ============================================================== bodies of higher-order ops
def _tensor_ph(g: fx.Graph, name: str, val: torch.Tensor) -> fx.Node:
    node = g.placeholder(name)
    node.meta["val"] = val
    return node


def _body(fn, *vals: torch.Tensor, root: nn.Module | None = None) -> fx.GraphModule:
    """A HOP body: placeholders with ``meta["val"]`` (as Dynamo/AOT leave them), ``fn(graph, *phs)`` the result."""
    g = fx.Graph()
    phs = [_tensor_ph(g, f"arg{i}", v) for i, v in enumerate(vals)]
    g.output((fn(g, *phs),))
    return fx.GraphModule(root if root is not None else nn.Module(), g)


def _scale_body(k, const: str = "floor") -> fx.GraphModule:
    """relu(t) * k, then a rounding with a str constant (for the masked-key test)."""
    def fn(g, t):
        r = g.call_function(torch.ops.aten.relu.default, (t,))
        m = g.call_function(torch.ops.aten.mul.Tensor, (r, k))
        return g.call_function(torch.ops.aten.div.Tensor_mode, (m, 1.0), {"rounding_mode": const})
    return _body(fn, torch.empty(4, 8))


def _with_attrs(attrs: dict[str, object], build) -> fx.GraphModule:
    root = nn.Module()
    for name, value in attrs.items():
        setattr(root, name, value)
    g = fx.Graph()
    build(g)
    return fx.GraphModule(root, g)


def checkpoint_piece(k, const: str = "floor", x_name: str = "x") -> fx.GraphModule:
    def build(g):
        x = g.placeholder(x_name)
        body = g.get_attr("wrap_body_0")
        out = g.call_function(torch.ops.higher_order.tag_activation_checkpoint, (body, x), {"use_reentrant": False})
        g.output((g.call_function(operator.getitem, (out, 0)),))
    return _with_attrs({"wrap_body_0": _scale_body(k, const)}, build)


def cond_piece(k_true, k_false) -> fx.GraphModule:
    def build(g):
        pred, x = g.placeholder("pred"), g.placeholder("x")
        t, f = g.get_attr("cond_true_0"), g.get_attr("cond_false_0")
        out = g.call_function(torch.ops.higher_order.cond, (pred, t, f, (x,)))
        g.output((g.call_function(operator.getitem, (out, 0)),))
    true = _body(lambda g, t: g.call_function(torch.ops.aten.mul.Tensor, (t, k_true)), torch.empty(4, 8))
    false = _body(lambda g, t: g.call_function(torch.ops.aten.sub.Tensor, (t, k_false)), torch.empty(4, 8))
    return _with_attrs({"cond_true_0": true, "cond_false_0": false}, build)


def flex_piece(temperature, window) -> fx.GraphModule:
    i = torch.empty((), dtype=torch.int32)

    def score(g, s, b, h, q, kv):
        return g.call_function(torch.ops.aten.div.Tensor, (s, temperature))

    def mask(g, b, h, q, kv):
        d = g.call_function(torch.ops.aten.sub.Tensor, (q, kv))
        return g.call_function(torch.ops.aten.lt.Scalar, (d, window))

    def build(g):
        q, k, v = g.placeholder("q"), g.placeholder("k"), g.placeholder("v")
        kv_num, kv_idx = g.placeholder("kv_num_blocks"), g.placeholder("kv_indices")
        score_mod, mask_mod = g.get_attr("score_mod_0"), g.get_attr("mask_fn_0")
        block_mask = (16, 16, kv_num, kv_idx, None, None, None, None, None, None, 128, 128, mask_mod)
        out = g.call_function(torch.ops.higher_order.flex_attention,
                              (q, k, v, score_mod, block_mask, 0.5, {"PRESCALE_QK": False}, (), ()))
        g.output((g.call_function(operator.getitem, (out, 0)),))
    return _with_attrs({"score_mod_0": _body(score, torch.empty(()), i, i, i, i),
                        "mask_fn_0": _body(mask, i, i, i, i)}, build)


CKPT_ARGS = [torch.zeros(4, 8)]
COND_ARGS = [torch.zeros((), dtype=torch.bool), torch.zeros(4, 8)]
FLEX_ARGS = [torch.zeros(1, 2, 16, 4)] * 3 + [torch.zeros(1, 1, 1, dtype=torch.int32), torch.zeros(1, 1, 1, 1, dtype=torch.int32)]


def key(gm: fx.GraphModule, args) -> str:
    return piece_signature(gm, args).key


def test_checkpoint_body_counts_in_the_key() -> None:
    """The issue's example as graphs: ``checkpoint(f)`` with ``f = relu(t) * k``, k per layer."""
    assert key(checkpoint_piece(2.0), CKPT_ARGS) != key(checkpoint_piece(3.0), CKPT_ARGS)
    assert key(checkpoint_piece(2), CKPT_ARGS) != key(checkpoint_piece(2.0), CKPT_ARGS)  # int vs float constant
    # identical bodies (built separately, other placeholder names): one key
    assert key(checkpoint_piece(2.0), CKPT_ARGS) == key(checkpoint_piece(2.0, x_name="hidden"), CKPT_ARGS)
    # and an ordinary piece is shareable (the disk cache serves it to other processes)
    assert getattr(piece_signature(checkpoint_piece(2.0), CKPT_ARGS), "unshareable", []) == []


def test_cond_branches_count_in_the_key() -> None:
    base = key(cond_piece(2.0, 1.0), COND_ARGS)
    assert key(cond_piece(3.0, 1.0), COND_ARGS) != base  # the true branch differs
    assert key(cond_piece(2.0, 5.0), COND_ARGS) != base  # the false branch differs
    assert key(cond_piece(2.0, 1.0), COND_ARGS) == base


def test_flex_attention_score_and_mask_mods_count_in_the_key() -> None:
    base = key(flex_piece(2.0, 4), FLEX_ARGS)
    assert key(flex_piece(3.0, 4), FLEX_ARGS) != base  # per-layer temperature in score_mod
    assert key(flex_piece(2.0, 8), FLEX_ARGS) != base  # per-layer window in mask_mod
    assert key(flex_piece(2.0, 4), FLEX_ARGS) == base


def test_nested_bodies_are_hashed_recursively() -> None:
    """A cond inside a checkpoint body: the innermost constant still counts."""
    def ckpt_around_cond(k: float) -> fx.GraphModule:
        inner = cond_piece(k, 1.0)
        g = fx.Graph()
        t = _tensor_ph(g, "t", torch.empty(4, 8))
        pred = g.call_function(torch.ops.aten.gt.Scalar, (g.call_function(torch.ops.aten.sum.default, (t,)), 0))
        tb, fb = g.get_attr("cond_true_0"), g.get_attr("cond_false_0")
        res = g.call_function(torch.ops.higher_order.cond, (pred, tb, fb, (t,)))
        g.output((g.call_function(operator.getitem, (res, 0)),))
        root = nn.Module()
        root.cond_true_0, root.cond_false_0 = inner.cond_true_0, inner.cond_false_0
        body = fx.GraphModule(root, g)
        gm = checkpoint_piece(1.0)
        gm.wrap_body_0 = body
        return gm

    assert key(ckpt_around_cond(2.0), CKPT_ARGS) != key(ckpt_around_cond(3.0), CKPT_ARGS)
    assert key(ckpt_around_cond(2.0), CKPT_ARGS) == key(ckpt_around_cond(2.0), CKPT_ARGS)


def test_body_str_constants_and_tensor_constants() -> None:
    """A str constant inside a body counts in the key but not the shape key (as at top level) and is
    reported; a tensor constant inside a body counts by content."""
    a, b = piece_signature(checkpoint_piece(2.0, "floor"), CKPT_ARGS), piece_signature(checkpoint_piece(2.0, "trunc"), CKPT_ARGS)
    assert a.key != b.key and a.shape_key == b.shape_key
    assert [c[2] for c in b.constants] == ["trunc"]

    def with_tensor(value: float) -> fx.GraphModule:
        def fn(g, t):
            return g.call_function(torch.ops.aten.mul.Tensor, (t, g.get_attr("scale")))
        root = nn.Module()
        root.register_buffer("scale", torch.full((8,), value))
        body = _body(fn, torch.empty(4, 8), root=root)
        gm = checkpoint_piece(1.0)
        gm.wrap_body_0 = body
        return gm

    assert key(with_tensor(2.0), CKPT_ARGS) != key(with_tensor(3.0), CKPT_ARGS)
    assert key(with_tensor(2.0), CKPT_ARGS) == key(with_tensor(2.0), CKPT_ARGS)


class _Opaque:
    """An object with no stable description of its content."""

    def __init__(self, k: float) -> None:
        self.k = k


def test_an_object_with_no_stable_description_is_unshareable() -> None:
    """Described by type only, two pieces holding different objects shared a key (and the disk cache):
    now each object's piece gets a key of its own, the same object the same key."""
    def piece(obj) -> fx.GraphModule:
        def build(g):
            x = g.placeholder("x")
            o = g.get_attr("obj")
            g.output((g.call_function(torch.ops.aten.mul.Tensor, (x, 2.0)), o))
        return _with_attrs({"obj": obj}, build)

    one, two = _Opaque(1.0), _Opaque(1.0)
    s1, s2 = piece_signature(piece(one), CKPT_ARGS), piece_signature(piece(two), CKPT_ARGS)
    assert s1.key != s2.key
    assert piece_signature(piece(one), CKPT_ARGS).key == s1.key
    assert getattr(s1, "unshareable", None), "the signature says why the piece is unshareable"


def test_python_call_target_counts_by_its_code_and_closure() -> None:
    """A user function in the graph (``allow_in_graph``) is traced into the compiled code: its
    closure constant counts, not just its qualified name."""
    def make(k: float):
        def scaled(t):
            return t * k
        return scaled

    def piece(fn) -> fx.GraphModule:
        g = fx.Graph()
        x = g.placeholder("x")
        g.output((g.call_function(fn, (x,)),))
        return fx.GraphModule(nn.Module(), g)

    assert key(piece(make(2.0)), CKPT_ARGS) != key(piece(make(3.0)), CKPT_ARGS)
    assert key(piece(make(2.0)), CKPT_ARGS) == key(piece(make(2.0)), CKPT_ARGS)
