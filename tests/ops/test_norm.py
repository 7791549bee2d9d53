"""``rms_norm``, ``fused_add_rms_norm`` and ``silu_and_mul`` against float64 references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import layerpass.ops  # noqa: F401  (registers torch.ops.layerpass.*)
from layerpass.ops import norm
from tests.helpers import reference as ref

rms_norm = torch.ops.layerpass.rms_norm
fused_add = torch.ops.layerpass.fused_add_rms_norm
silu_and_mul = torch.ops.layerpass.silu_and_mul

dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
lead = st.lists(st.integers(1, 6), min_size=0, max_size=2)  # leading dims; [] is a 1-D input
eps = st.sampled_from([1e-6, 1e-5, 0.1])


def randn(shape, dtype, seed, spread: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * spread).to(dtype)


@settings(max_examples=40, deadline=None)
@given(lead, st.integers(1, 33), dtypes, eps, st.floats(1e-2, 1e2), st.integers(0, 2**31 - 1))
def test_rms_norm(lead, hidden, dtype, epsilon, spread, seed) -> None:
    x, w = randn((*lead, hidden), dtype, seed, spread), randn((hidden,), dtype, seed + 1)
    out = rms_norm(x, w, epsilon)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref.rms_norm(x, w, epsilon), **ref.TOL[dtype])


@settings(max_examples=40, deadline=None)
@given(lead, st.integers(1, 33), dtypes, eps, st.integers(0, 2**31 - 1))
def test_fused_add_rms_norm(lead, hidden, dtype, epsilon, seed) -> None:
    x, res, w = randn((*lead, hidden), dtype, seed), randn((*lead, hidden), dtype, seed + 1), randn((hidden,), dtype, seed + 2)
    x_before, res_before = x.clone(), res.clone()
    normed, summed = fused_add(x, res, w, epsilon)
    expected_sum = (x.double() + res.double()).to(dtype)
    assert torch.equal(summed, expected_sum)  # one rounding of the exact sum
    torch.testing.assert_close(normed, ref.rms_norm(expected_sum, w, epsilon), **ref.TOL[dtype])
    assert torch.equal(x, x_before) and torch.equal(res, res_before)  # functional: inputs untouched


@settings(max_examples=40, deadline=None)
@given(lead, st.integers(1, 16), dtypes, st.integers(0, 2**31 - 1))
def test_silu_and_mul(lead, half, dtype, seed) -> None:
    x = randn((*lead, 2 * half), dtype, seed, 3.0)
    out = silu_and_mul(x)
    assert out.shape == (*lead, half)
    torch.testing.assert_close(out, ref.silu_and_mul(x), **ref.TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype) -> None:
    x, r, w = randn((5, 8), dtype, 0), randn((5, 8), dtype, 1), randn((8,), dtype, 2)
    torch.library.opcheck(rms_norm.default, (x, w, 1e-6))
    torch.library.opcheck(fused_add.default, (x, r, w, 1e-6))
    torch.library.opcheck(silu_and_mul.default, (x,))


@settings(max_examples=15, deadline=None)
@given(lead, st.integers(1, 8), dtypes)
def test_fake_matches_real(lead, half, dtype) -> None:
    x, r, w = randn((*lead, 2 * half), dtype, 0), randn((*lead, 2 * half), dtype, 1), randn((2 * half,), dtype, 2)
    ref.assert_fake_matches_real(rms_norm, x, w, 1e-6)
    ref.assert_fake_matches_real(fused_add, x, r, w, 1e-6)
    ref.assert_fake_matches_real(silu_and_mul, x)


@pytest.mark.parametrize(
    "call,fragment",
    [
        (lambda: norm.rms_norm(torch.randn(2, 4), torch.ones(5), 1e-6), "weight must have shape"),
        (lambda: norm.rms_norm(torch.ones(2, 4, dtype=torch.int32), torch.ones(4), 1e-6), "input must be"),
        (lambda: norm.fused_add_rms_norm(torch.randn(2, 4), torch.randn(3, 4), torch.ones(4), 1e-6), "residual must match"),
        (lambda: norm.fused_add_rms_norm(torch.randn(2, 4).bfloat16(), torch.randn(2, 4), torch.ones(4), 1e-6), "residual must match"),
        (lambda: norm.silu_and_mul(torch.randn(2, 5)), "even last dimension"),
    ],
)
def test_bad_input_raises_clear_error(call, fragment) -> None:
    """The checked entry points (what layers call) raise; the raw ops do not check (a compiled step
    calls them: see ``tests/ops/test_checks.py``)."""
    with pytest.raises(ValueError, match=fragment):
        call()
