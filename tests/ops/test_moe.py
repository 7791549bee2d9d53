"""``moe_forward`` / ``moe_forward_shared`` against ``reference.moe`` (token by token)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import reference as ref
from layerpass.ops import LayerNotFoundError, LayerRegistry, encode_layer_name, set_forward_context
from layerpass.ops import moe as moe_mod

ops = torch.ops.layerpass
PREFIX = "model.layers.0.mlp.experts"


def make_layer(num_experts, hidden, inter, top_k, renormalize, dtype, seed, shared_inter=None):
    torch.manual_seed(seed)
    layer = ref.MoELayer(PREFIX, num_experts, hidden, inter, top_k, renormalize, dtype, shared_inter)
    registry = LayerRegistry("moe-test")
    registry.register(PREFIX, layer)
    return layer, registry


@st.composite
def moe_cases(draw, shared: bool = False):
    num_experts = draw(st.integers(1, 8))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    seed = draw(st.integers(0, 2**31 - 1))
    layer, registry = make_layer(
        num_experts, draw(st.integers(1, 12)), draw(st.integers(1, 10)), draw(st.integers(1, num_experts)),
        draw(st.booleans()), dtype, seed, draw(st.integers(1, 6)) if shared else None)
    num_tokens = draw(st.integers(0, 9))
    g = torch.Generator().manual_seed(seed + 1)
    hidden = layer.w13_weight.shape[2]
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    logits = (torch.randn(num_tokens, num_experts, generator=g) * 2).to(dtype)
    return layer, registry, x, logits


def tol(dtype):
    return {"atol": 3e-2, "rtol": 3e-2} if dtype == torch.bfloat16 else ref.TOL[dtype]


@settings(max_examples=40, deadline=None)
@given(moe_cases())
def test_moe_forward(case) -> None:
    layer, registry, x, logits = case
    with set_forward_context(None, registry):
        out = ops.moe_forward(x, logits, encode_layer_name(PREFIX))
    assert out.shape == x.shape and out.dtype == x.dtype
    expected = ref.moe(x, logits, layer.w13_weight, layer.w2_weight, layer.top_k, layer.renormalize)
    torch.testing.assert_close(out.double(), expected, **tol(x.dtype))


@settings(max_examples=25, deadline=None)
@given(moe_cases(shared=True))
def test_moe_forward_shared(case) -> None:
    layer, registry, x, logits = case
    with set_forward_context(None, registry):
        routed, shared = ops.moe_forward_shared(x, logits, encode_layer_name(PREFIX))
    expected = ref.moe(x, logits, layer.w13_weight, layer.w2_weight, layer.top_k, layer.renormalize)
    torch.testing.assert_close(routed.double(), expected, **tol(x.dtype))
    torch.testing.assert_close(shared, layer.shared_experts(x))


def test_renormalize_changes_scale() -> None:
    """With top_k < E, renormalised weights sum to 1, so a layer whose experts all compute
    the same map returns exactly that map's output; without, it is scaled by sum(top-k probs)."""
    layer, registry = make_layer(4, 6, 5, 2, True, torch.float64, 0)
    layer.w13_weight.data[:] = layer.w13_weight.data[0]
    layer.w2_weight.data[:] = layer.w2_weight.data[0]
    x, logits = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    single = ref.moe(x, torch.zeros(3, 1, dtype=torch.float64), layer.w13_weight[:1], layer.w2_weight[:1], 1, False)
    with set_forward_context(None, registry):
        # routing weights are computed in float32, hence the tolerance
        torch.testing.assert_close(ops.moe_forward(x, logits, encode_layer_name(PREFIX)), single, atol=1e-6, rtol=1e-5)
        layer.renormalize = False
        top2 = torch.softmax(logits, -1).topk(2, -1).values.sum(-1, keepdim=True)
        torch.testing.assert_close(ops.moe_forward(x, logits, encode_layer_name(PREFIX)), single * top2, atol=1e-6, rtol=1e-5)


def test_opcheck() -> None:
    layer, registry = make_layer(4, 8, 6, 2, True, torch.float32, 0, shared_inter=4)
    x, logits = torch.randn(5, 8), torch.randn(5, 4)
    with set_forward_context(None, registry):
        torch.library.opcheck(ops.moe_forward.default, (x, logits, encode_layer_name(PREFIX)))
        torch.library.opcheck(ops.moe_forward_shared.default, (x, logits, encode_layer_name(PREFIX)))


@settings(max_examples=10, deadline=None)
@given(moe_cases(shared=True))
def test_fake_matches_real(case) -> None:
    layer, registry, x, logits = case
    with set_forward_context(None, registry):
        ref.assert_fake_matches_real(ops.moe_forward, x, logits, encode_layer_name(PREFIX))
        ref.assert_fake_matches_real(ops.moe_forward_shared, x, logits, encode_layer_name(PREFIX))


@pytest.mark.parametrize(
    "make,exc,fragment",
    [
        (lambda l: (torch.randn(3, 8), torch.randn(3, 5)), ValueError, "5 experts, layer has 4"),
        (lambda l: (torch.randn(3, 7), torch.randn(3, 4)), ValueError, "hidden size 7"),
        (lambda l: (torch.randn(3, 8), torch.randn(2, 4)), ValueError, r"\[T, H\] and router_logits \[T, E\]"),
        (lambda l: (torch.randn(2, 3, 8), torch.randn(2, 3, 4)), ValueError, r"\[T, H\]"),
        (lambda l: (torch.ones(3, 8, dtype=torch.int64), torch.randn(3, 4)), ValueError, "must be float"),
        (lambda l: setattr(l, "top_k", 5) or (torch.randn(3, 8), torch.randn(3, 4)), ValueError, "top_k must be in"),
    ],
)
def test_bad_input_raises_clear_error(make, exc, fragment) -> None:
    layer, registry = make_layer(4, 8, 6, 2, True, torch.float32, 0)
    x, logits = make(layer)
    with set_forward_context(None, registry), pytest.raises(exc, match=fragment):
        moe_mod.moe_forward(x, logits, encode_layer_name(PREFIX))  # the checked entry point


def test_shared_without_shared_experts_and_unknown_layer() -> None:
    layer, registry = make_layer(4, 8, 6, 2, True, torch.float32, 0)
    x, logits = torch.randn(3, 8), torch.randn(3, 4)
    with set_forward_context(None, registry):
        with pytest.raises(ValueError, match="no shared_experts"):
            ops.moe_forward_shared(x, logits, encode_layer_name(PREFIX))
        with pytest.raises(LayerNotFoundError, match="mlp.experts"):
            ops.moe_forward(x, logits, encode_layer_name("model.layers.0.mlp.expert"))
