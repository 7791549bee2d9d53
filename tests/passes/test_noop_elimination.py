"""No-op elimination: reshapes/views/slices that provably change nothing go; everything else stays.

Graphs are traced with ``make_fx`` (real and symbolic shapes); each case states which nodes are
no-ops, the pass must remove exactly those, and the graph must compute the same values after.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx

from tests.helpers import fusion as fh
from layerpass.passes.noop_elimination import NoOpEliminationPass

aten = torch.ops.aten
VIEWISH = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.slice.Tensor)


def _count(gm) -> int:
    counts = fh.op_counts(gm.graph)
    return sum(counts[k] for k in VIEWISH)


def _run(fn, args, mode="real"):
    gm = make_fx(fn, tracing_mode=mode)(*args)
    before = _count(gm)
    new, matches = fh.apply_passes(gm, [NoOpEliminationPass()])
    ref = fn(*args)
    out = new(*args)
    for a, b in zip(ref if isinstance(ref, tuple) else (ref,), out if isinstance(out, tuple) else (out,)):
        assert torch.equal(a, b) and a.shape == b.shape
    return before, _count(new), matches["noop_elimination"], new


def test_removes_same_shape_view_reshape_and_full_slice() -> None:
    def fn(x):
        a = aten.view.default(x, [4, 6])  # same shape: no-op
        b = aten.reshape.default(a, [4, 6])  # same shape of a contiguous tensor: no-op
        c = aten.slice.Tensor(b, 1, 0, 9223372036854775807)  # full slice: no-op
        d = aten.slice.Tensor(c, 0, 0, 4)  # full slice written with the exact end: no-op
        return d * 2

    before, after, matches, _ = _run(fn, [torch.randn(4, 6)])
    assert (before, after, matches) == (4, 0, 4)


def test_keeps_shape_changing_views_and_partial_or_strided_slices() -> None:
    def fn(x):
        a = aten.view.default(x, [6, 4])  # changes the shape
        b = aten.slice.Tensor(a, 0, 1, 6)  # drops a row
        c = aten.slice.Tensor(b, 1, 0, 4, 2)  # step 2
        return c + 1, aten.reshape.default(x, [24])

    before, after, matches, _ = _run(fn, [torch.randn(4, 6)])
    assert (before, after, matches) == (4, 4, 0)


def test_collapses_view_chains() -> None:
    """``view(view(x, s1), s2)`` -> ``view(x, s2)``: the middle view (one user) is skipped."""

    def fn(x):
        return aten.view.default(aten.view.default(aten.view.default(x, [2, 12]), [3, 8]), [6, 4]) + 0

    before, after, matches, new = _run(fn, [torch.randn(4, 6)])
    assert before == 3 and after == 1 and matches == 2
    (view,) = [n for n in new.graph.nodes if n.target is aten.view.default]
    assert view.args[0].op == "placeholder"


def test_middle_view_with_other_users_is_kept() -> None:
    def fn(x):
        mid = aten.view.default(x, [2, 12])
        return aten.view.default(mid, [3, 8]) + 0, mid * 3

    before, after, matches, _ = _run(fn, [torch.randn(4, 6)])
    assert (before, after, matches) == (2, 2, 0)


def _post_grad_like(build, *example):
    """A graph built node by node (post-grad graphs keep ``aten.reshape``, which ``make_fx``
    would decompose), with fake-tensor ``val`` metadata as Inductor has it."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    g = fx.Graph()
    g.output(build(g, *[g.placeholder(f"x{i}") for i in range(len(example))]))
    gm = fx.GraphModule(torch.nn.Module(), g)
    FakeTensorProp(gm).propagate(*example)
    return gm


@pytest.mark.parametrize("outer", ["view", "reshape"])
def test_reshape_of_non_contiguous_is_not_collapsed_into_a_view(outer) -> None:
    """``view(reshape(x.t(), s1), s2)``: the reshape copies, so skipping it would view a
    non-contiguous tensor (a runtime error). An outer reshape may skip it (it copies itself)."""
    target = aten.view.default if outer == "view" else aten.reshape.default

    def build(g, x):
        t = g.call_function(aten.permute.default, (x, [1, 0]))
        r = g.call_function(aten.reshape.default, (t, [24]))
        return g.call_function(target, (r, [4, 6]))

    x = torch.randn(4, 6)
    gm = _post_grad_like(build, x)
    new, matches = fh.apply_passes(gm, [NoOpEliminationPass()])
    assert matches["noop_elimination"] == (0 if outer == "view" else 1)
    assert torch.equal(new(x), x.t().reshape(24).reshape(4, 6))


def test_symbolic_shapes_removed_only_when_provable() -> None:
    """With symbolic sizes: a view to the input's own symbolic shape is removed; a view whose
    size is another symbol's expression (not provably equal) stays."""

    def fn(x, y):
        same = aten.view.default(x, [x.shape[0], x.shape[1]])
        other = aten.view.default(y, [x.shape[0], -1])  # y: [s0 * 2, 3] -> [s0, 6]: not a no-op
        return same + 1, other

    gm = make_fx(fn, tracing_mode="symbolic")(torch.randn(5, 3), torch.randn(10, 3))
    new, matches = fh.apply_passes(gm, [NoOpEliminationPass()])
    assert matches["noop_elimination"] == 1
    assert fh.op_counts(new.graph)[aten.view.default] == 1
    x, y = torch.randn(7, 3), torch.randn(14, 3)
    for a, b in zip(fn(x, y), new(x, y)):
        assert torch.equal(a, b)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=3), st.data())
def test_random_view_chains_keep_values(shape, data) -> None:
    """Random chains of views/reshapes/slices over random shapes: the values never change, and a
    chain that ends where it started leaves at most one view."""
    n = 1
    for s in shape:
        n *= s
    steps = data.draw(st.lists(st.sampled_from(["flat", "back", "same", "slice_full"]), min_size=1, max_size=5))

    def fn(x):
        y = x
        for s in steps:
            if s == "flat":
                y = aten.view.default(y, [n])
            elif s == "back":
                y = aten.reshape.default(y, list(shape))
            elif s == "same":
                y = aten.view.default(y, list(y.shape))
            else:
                y = aten.slice.Tensor(y, 0, 0, 9223372036854775807)
        return aten.reshape.default(y, list(shape)) + 0

    _, after, _, _ = _run(fn, [torch.randn(*shape)])
    assert after <= 1


@pytest.mark.parametrize("dtype_change", [True])
def test_view_dtype_is_not_a_noop(dtype_change) -> None:
    def fn(x):
        return aten.view.dtype(x, torch.int32) + 0

    before, after, matches, _ = _run(fn, [torch.randn(4, 6)])
    assert matches == 0
