"""The exact FP8 rounding of the Triton quant kernel (under the Triton interpreter, on CPU tensors).

The interpreter set-up and ``load_interpreted`` live in ``tests/helpers/triton.py``; the FP8
comparisons in ``tests/helpers/fp8.py``.
"""

from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers.triton import load_interpreted
from tests.helpers.fp8 import FP8, FP8_MAX, all_fp8_values

quant = load_interpreted("quant")


def _quantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    return quant.static_scaled_fp8_quant_functional(x, torch.tensor([scale]))


def test_fp8_rounding_matches_torch_on_every_value_and_tie() -> None:
    """Exact grid values, midpoints (ties to even), near-midpoints, subnormals, saturation."""
    vals = all_fp8_values()
    mids = (vals[1:] + vals[:-1]) / 2
    extra = torch.tensor([0.0, -0.0, 1e-12, -1e-12, 449.0, -460.0, 1e6, float("inf"), -float("inf")])
    x = torch.cat([vals, mids, mids * (1 + 1e-6), mids * (1 - 1e-6), extra])
    out = _quantize(x, 1.0)
    ref = x.clamp(-FP8_MAX, FP8_MAX).to(FP8)
    assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))


def test_fp8_nan_stays_nan() -> None:
    out = _quantize(torch.tensor([float("nan"), 1.0]), 1.0)
    assert out.float()[0].isnan() and out.float()[1] == 1.0


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 3000),
    scale=st.floats(1e-3, 50.0),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_static_quant_bit_exact(n: int, scale: float, dtype: torch.dtype, seed: int) -> None:
    """Division by the scale is IEEE-exact on both sides, so the result is bit-identical."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g) * 200).to(dtype)
    s = torch.tensor([scale])
    ref = (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    assert torch.equal(quant.static_scaled_fp8_quant_functional(x, s).view(torch.uint8), ref.view(torch.uint8))
    out = torch.empty_like(x, dtype=FP8)
    quant.static_scaled_fp8_quant(out, x, s)
    assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))


def test_static_quant_strided_input_and_output() -> None:
    x = torch.randn(6, 10) * 100
    s = torch.tensor(0.7)  # a 0-d scale is one element too
    ref = torch.ops.layerpass.static_scaled_fp8_quant_functional(x.t(), s)
    out = torch.empty(6, 10, dtype=FP8).t()  # non-contiguous result
    assert not out.is_contiguous()
    quant.static_scaled_fp8_quant(out, x.t(), s)
    assert torch.equal(out.contiguous().view(torch.uint8), ref.view(torch.uint8))


def test_static_quant_rejects_bad_input() -> None:
    """The checked entry points reject bad input whichever kernel serves the device; the Triton
    kernels themselves do not check (a compiled step calls them: tests/ops/test_checks.py)."""
    from layerpass.ops import quant as checked

    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="one-element scale"):
        checked.static_scaled_fp8_quant_functional(x, torch.ones(2))
    with pytest.raises(ValueError, match="result must be"):
        checked.static_scaled_fp8_quant(torch.empty(4, 8), x, torch.ones(1))
    with pytest.raises(ValueError, match="input must be"):
        checked.static_scaled_fp8_quant_functional(x.to(torch.int32), torch.ones(1))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
