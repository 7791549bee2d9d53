"""Fused norm/act + static FP8 quant ops: equal to the reference, and bit-equal to the
unfused op chain they replace (what makes the fusion passes semantics-preserving)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import reference as ref
from layerpass.ops import FP8_DTYPE
from layerpass.ops import fused  # the checked entry points (the raw ops do not check)

ops = torch.ops.layerpass
dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
shapes = st.tuples(st.integers(1, 6), st.integers(1, 12))  # (tokens, hidden / half-width)
scales = st.sampled_from([0.002, 0.02, 0.3, 1.7])  # 0.002 saturates


def randn(shape, dtype, seed, spread: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * spread).to(dtype)


def bits(x: torch.Tensor) -> torch.Tensor:
    return ref.fp8_bits(x)


@settings(max_examples=40, deadline=None)
@given(shapes, dtypes, scales, st.integers(0, 2**31 - 1))
def test_rms_norm_quant(shape, dtype, scale, seed) -> None:
    x, w, s = randn(shape, dtype, seed), randn(shape[1:], dtype, seed + 1), torch.tensor(scale)
    out = ops.rms_norm_static_fp8_quant(x, w, s, 1e-6)
    assert out.dtype == FP8_DTYPE and out.shape == x.shape
    assert torch.equal(bits(out), bits(ops.static_scaled_fp8_quant_functional(ops.rms_norm(x, w, 1e-6), s)))
    # against the float64 reference: within one fp8 step (rounding of the model-dtype norm may differ)
    expected = ref.quant_fp8(ref.rms_norm(x, w, 1e-6), scale).float()
    assert torch.all((out.float() - expected).abs() <= expected.abs() / 8 + 2.0**-8)


@settings(max_examples=40, deadline=None)
@given(shapes, dtypes, scales, st.integers(0, 2**31 - 1))
def test_fused_add_rms_norm_quant(shape, dtype, scale, seed) -> None:
    x, r, w, s = randn(shape, dtype, seed), randn(shape, dtype, seed + 1), randn(shape[1:], dtype, seed + 2), torch.tensor(scale)
    quantised, summed = ops.fused_add_rms_norm_static_fp8_quant(x, r, w, s, 1e-6)
    normed, summed_unfused = ops.fused_add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(summed, summed_unfused)
    assert torch.equal(summed, (x.double() + r.double()).to(dtype))
    assert torch.equal(bits(quantised), bits(ops.static_scaled_fp8_quant_functional(normed, s)))


@settings(max_examples=40, deadline=None)
@given(shapes, dtypes, scales, st.integers(0, 2**31 - 1))
def test_silu_and_mul_quant(shape, dtype, scale, seed) -> None:
    tokens, half = shape
    x, s = randn((tokens, 2 * half), dtype, seed, 3.0), torch.tensor(scale)
    out = ops.silu_and_mul_static_fp8_quant(x, s)
    assert out.dtype == FP8_DTYPE and out.shape == (tokens, half)
    assert torch.equal(bits(out), bits(ops.static_scaled_fp8_quant_functional(ops.silu_and_mul(x), s)))
    expected = ref.quant_fp8(ref.silu_and_mul(x), scale).float()
    assert torch.all((out.float() - expected).abs() <= expected.abs() / 8 + 2.0**-8)


def test_opcheck() -> None:
    x, r, w, s = randn((4, 8), torch.bfloat16, 0), randn((4, 8), torch.bfloat16, 1), randn((8,), torch.bfloat16, 2), torch.tensor(0.1)
    torch.library.opcheck(ops.rms_norm_static_fp8_quant.default, (x, w, s, 1e-6))
    torch.library.opcheck(ops.fused_add_rms_norm_static_fp8_quant.default, (x, r, w, s, 1e-6))
    torch.library.opcheck(ops.silu_and_mul_static_fp8_quant.default, (x, s))


@settings(max_examples=15, deadline=None)
@given(shapes, dtypes)
def test_fake_matches_real(shape, dtype) -> None:
    tokens, half = shape
    x, r = randn((tokens, 2 * half), dtype, 0), randn((tokens, 2 * half), dtype, 1)
    w, s = randn((2 * half,), dtype, 2), torch.tensor(0.5)
    ref.assert_fake_matches_real(ops.rms_norm_static_fp8_quant, x, w, s, 1e-6)
    ref.assert_fake_matches_real(ops.fused_add_rms_norm_static_fp8_quant, x, r, w, s, 1e-6)
    ref.assert_fake_matches_real(ops.silu_and_mul_static_fp8_quant, x, s)


@pytest.mark.parametrize(
    "call,fragment",
    [
        (lambda: fused.rms_norm_static_fp8_quant(torch.randn(2, 4), torch.ones(3), torch.tensor(1.0), 1e-6), "weight must have shape"),
        (lambda: fused.rms_norm_static_fp8_quant(torch.randn(2, 4), torch.ones(4), torch.ones(4), 1e-6), "one-element scale"),
        (lambda: fused.fused_add_rms_norm_static_fp8_quant(torch.randn(2, 4), torch.randn(2, 4).double(), torch.ones(4),
                                                         torch.tensor(1.0), 1e-6), "residual must match"),
        (lambda: fused.silu_and_mul_static_fp8_quant(torch.randn(2, 5), torch.tensor(1.0)), "even last dimension"),
        (lambda: fused.silu_and_mul_static_fp8_quant(torch.randn(2, 4), torch.ones(2)), "one-element scale"),
    ],
)
def test_bad_input_raises_clear_error(call, fragment) -> None:
    with pytest.raises(ValueError, match=fragment):
        call()
