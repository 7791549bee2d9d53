"""Triton RMSNorm (+residual add) (+FP8 quant) and SiLU-and-mul (+FP8 quant) vs the CPU ops."""

from __future__ import annotations

from tests.helpers.triton import load_interpreted
from tests.helpers.fp8 import assert_fp8_close

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import layerpass.ops  # noqa: E402,F401  (registers torch.ops.layerpass.*)

norm_quant = load_interpreted("norm_quant")
activation = load_interpreted("activation")
ops = torch.ops.layerpass
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


def _inputs(seed: int, shape: tuple[int, ...], dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


@settings(max_examples=10, deadline=None)
@given(
    rows=st.integers(1, 4),
    h=st.integers(1, 160),
    dtype=DTYPES,
    block=st.sampled_from([None, 32]),  # a small tile forces the chunked row loop
    eps=st.sampled_from([1e-6, 1e-5, 0.1]),
    seed=st.integers(0, 2**16),
)
def test_rms_norm_family(rows: int, h: int, dtype: torch.dtype, block: int | None, eps: float, seed: int) -> None:
    x = _inputs(seed, (rows, h), dtype, 3.0)
    res = _inputs(seed + 1, (rows, h), dtype, 3.0)
    w = _inputs(seed + 2, (h,), dtype) + 1
    scale = torch.tensor([0.05])

    out, _ = norm_quant.rms_norm_launch(x, w, eps, block=block)
    torch.testing.assert_close(out, ops.rms_norm(x, w, eps))

    out, summed = norm_quant.rms_norm_launch(x, w, eps, residual=res, block=block)
    ref_out, ref_summed = ops.fused_add_rms_norm(x, res, w, eps)
    assert torch.equal(summed, ref_summed)  # one rounding of an exact fp32 sum: bit exact
    torch.testing.assert_close(out, ref_out)

    q, _ = norm_quant.rms_norm_launch(x, w, eps, scale=scale, block=block)
    assert_fp8_close(q, ops.rms_norm_static_fp8_quant(x, w, scale, eps))

    q, summed = norm_quant.rms_norm_launch(x, w, eps, residual=res, scale=scale, block=block)
    ref_q, ref_summed = ops.fused_add_rms_norm_static_fp8_quant(x, res, w, scale, eps)
    assert torch.equal(summed, ref_summed)
    assert_fp8_close(q, ref_q)


def test_rms_norm_wrappers_keep_shape_and_match_ops() -> None:
    """The registered wrappers (op signatures), on a 3-D input with a strided view."""
    x = _inputs(0, (2, 3, 64), torch.bfloat16, 2.0)
    res = _inputs(1, (2, 3, 64), torch.bfloat16, 2.0)
    w = _inputs(2, (64,), torch.bfloat16) + 1
    s = torch.tensor([0.02])
    xs = _inputs(3, (2, 3, 128), torch.bfloat16)[..., ::2]  # inner stride 2
    torch.testing.assert_close(norm_quant.rms_norm(xs, w, 1e-6), ops.rms_norm(xs, w, 1e-6))
    out, summed = norm_quant.fused_add_rms_norm(x, res, w, 1e-6)
    ref_out, ref_summed = ops.fused_add_rms_norm(x, res, w, 1e-6)
    assert out.shape == summed.shape == x.shape and torch.equal(summed, ref_summed)
    torch.testing.assert_close(out, ref_out)
    assert_fp8_close(norm_quant.rms_norm_static_fp8_quant(x, w, s, 1e-6), ops.rms_norm_static_fp8_quant(x, w, s, 1e-6))
    q, summed = norm_quant.fused_add_rms_norm_static_fp8_quant(x, res, w, s, 1e-6)
    ref_q, ref_summed = ops.fused_add_rms_norm_static_fp8_quant(x, res, w, s, 1e-6)
    assert_fp8_close(q, ref_q)
    assert torch.equal(summed, ref_summed)


def test_rms_norm_rejects_bad_input() -> None:
    """The checked entry points reject bad input whichever kernel serves the device; the Triton
    kernels themselves do not check (a compiled step calls them: tests/ops/test_checks.py)."""
    from layerpass.ops import fused, norm

    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight must have shape"):
        norm.rms_norm(x, torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="residual must match"):
        norm.fused_add_rms_norm(x, torch.randn(2, 9), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="one-element scale"):
        fused.rms_norm_static_fp8_quant(x, torch.ones(8), torch.ones(3), 1e-6)


@settings(max_examples=12, deadline=None)
@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    d=st.integers(1, 300),
    dtype=DTYPES,
    seed=st.integers(0, 2**16),
)
def test_silu_and_mul_family(lead: list[int], d: int, dtype: torch.dtype, seed: int) -> None:
    x = _inputs(seed, (*lead, 2 * d), dtype, 3.0)
    s = torch.tensor([0.01])
    torch.testing.assert_close(activation.silu_and_mul(x), ops.silu_and_mul(x))
    assert_fp8_close(activation.silu_and_mul_static_fp8_quant(x, s), ops.silu_and_mul_static_fp8_quant(x, s))


def test_silu_and_mul_rejects_odd_width() -> None:
    from layerpass.ops import norm  # the checked entry point (the Triton kernel does not check)

    with pytest.raises(ValueError, match="even last dimension"):
        norm.silu_and_mul(torch.randn(3, 5))
