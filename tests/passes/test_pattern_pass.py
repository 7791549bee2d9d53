"""The pattern-pass base: ``partial_pattern`` (one body, the layer name bound), one pattern body per
name-bearing fusion, ``op_name`` (the one spelling of op names) and the name matching in ``prepare``.
Registration counts per switch setting, on real passes, are in ``tests/patterns/test_registrations.py``."""

from __future__ import annotations

import inspect

import pytest
import torch

from layerpass.ops.library import op_name
from layerpass.passes.base import PieceContext
from layerpass.passes.pattern_pass import LAYER_NAME_ARG, PatternPass, partial_pattern
from layerpass.patterns import attn_quant, moe_quant_input, moe_shared

lp = torch.ops.layerpass


def body(x, wg, w, layer_name):
    return (x, wg, w, layer_name)


def test_partial_pattern_drops_bound_parameters_anywhere() -> None:
    fn = partial_pattern(body, wg=None)
    assert list(inspect.signature(fn).parameters) == ["x", "w", "layer_name"]
    assert fn(1, 2, "n") == (1, None, 2, "n") and fn(1, w=2, layer_name="n") == (1, None, 2, "n")
    named = partial_pattern(fn, layer_name="model.layers.3.attn")  # bound twice: both stay bound
    assert list(inspect.signature(named).parameters) == ["x", "w"]
    assert named(1, 2) == (1, None, 2, "model.layers.3.attn")
    assert named.__name__ == "body"
    with pytest.raises(TypeError, match="no parameter"):
        partial_pattern(body, eps=1e-6)


@pytest.mark.parametrize("module", [attn_quant, moe_shared, moe_quant_input])
def test_one_pattern_body_per_name_bearing_fusion(module) -> None:
    """ONE pattern body (and one replacement), the layer name one of its parameters: the same body
    serves both settings of the switch."""
    own = [f for f in vars(module).values() if inspect.isfunction(f) and f.__module__ == module.__name__]
    for kind in ("pattern", "replacement"):
        (fn,) = [f for f in own if f.__name__.endswith(f"_{kind}")]
        assert LAYER_NAME_ARG in inspect.signature(fn).parameters, fn.__name__
    passes = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, PatternPass)
              and c.__module__ == module.__name__]
    assert len(passes) == 1 and passes[0].named_op is not None


def test_op_name_spellings() -> None:
    assert op_name(lp.moe_forward.default) == "layerpass.moe_forward"
    assert op_name(lp.moe_forward.default, overload=True) == "layerpass.moe_forward.default"
    assert op_name(lp.moe_forward) == op_name(lp.moe_forward, overload=True) == "layerpass.moe_forward"
    assert op_name(torch.ops.aten.add.Tensor, overload=True) == "aten.add.Tensor"
    assert op_name("layerpass::moe_forward") == "layerpass.moe_forward"
    assert op_name("layerpass.moe_forward.default") == "layerpass.moe_forward"
    assert op_name("torch._ops.layerpass.some_module_noise.moe_forward", overload=True) == "layerpass.moe_forward"
    for not_an_op in ("moe_forward", "a.b.c.d", "a..b", print, None, 3):
        assert op_name(not_an_op) is None, not_an_op


class _Named(PatternPass):
    name = "named_test_pass"
    named_op = lp.moe_forward

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str | None] = []

    def register_layer_patterns(self, layer_name: str | None) -> None:
        self.seen.append(layer_name)


def test_prepare_registers_per_name_only_for_the_named_op(monkeypatch) -> None:
    """Without LayerName: one registration per new layer name passed to ``named_op``, in either
    spelling the backend writes (overload or packet); other ops' ``str`` arguments are ignored
    (``moe_forward`` is not ``moe_forward_shared``). With LayerName: one, with no name."""
    from layerpass import envs

    consts = [("a", "layerpass.moe_forward.default", "l0.experts"), ("b", "layerpass.moe_forward", "l1.experts"),
              ("c", "layerpass.moe_forward_shared.default", "l2.experts"), ("d", "aten._assert_scalar.default", "x"),
              ("e", "layerpass.moe_forward.default", "l0.experts")]
    monkeypatch.setattr(envs, "USE_LAYERNAME", False)
    p = _Named()
    p.prepare(PieceContext(str_constants=consts))
    p.prepare(PieceContext(str_constants=consts))
    assert p.seen == ["l0.experts", "l1.experts"]
    monkeypatch.setattr(envs, "USE_LAYERNAME", True)
    q = _Named()
    q.prepare(PieceContext(str_constants=consts))
    q.prepare(PieceContext())
    assert q.seen == [None]
