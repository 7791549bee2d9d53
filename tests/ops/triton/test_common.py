"""Shared set-up for the Triton kernel tests, plus tests of the exact FP8 rounding helper.

The kernels run on CPU tensors under the Triton interpreter. ``@triton.jit`` decides at
decoration time whether a function is interpreted, and the interpreter reads
``TRITON_INTERPRET`` again while a kernel runs; so the variable is set here, before the kernel
modules are imported, and left set for the test process (a CPU tensor can only run through the
interpreter anyway). Where CUDA is present the tests skip unless the caller set it, so that a
GPU run's other Triton kernels (Inductor's) stay compiled. The kernels use none of triton's own
``@jit`` helpers (``tl.sum`` ...), so it does not matter whether something imported triton
earlier; if a kernel module itself was imported earlier without the variable, they skip.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    if torch.cuda.is_available():  # keep the interpreter away from a GPU run's compiled kernels
        pytest.skip(
            "CUDA is present: these CPU-tensor tests need the Triton interpreter process-wide; run them "
            "on their own with TRITON_INTERPRET=1 pytest tests/test_triton_*.py", allow_module_level=True,
        )
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton", reason="triton is not installed (optional extra: pip install 'layerpass[triton]')")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from layerpass.ops import FP8_DTYPE, FP8_MAX  # noqa: E402

KERNEL_PACKAGE = "layerpass.ops.triton"
_NOT_INTERPRETED = (
    "the kernel module was imported before TRITON_INTERPRET=1 was set, so its kernels target a GPU "
    "and cannot run on CPU tensors; run the tests/test_triton_*.py files in a fresh process"
)


def load_interpreted(name: str) -> ModuleType:
    """Import ``layerpass.ops.triton.<name>``, skipping the calling module if its kernels target a GPU."""
    module = importlib.import_module(f"{KERNEL_PACKAGE}.{name}")
    kernels = [v for v in vars(module).values() if isinstance(v, triton.runtime.JITFunction)]
    if any(not isinstance(v, InterpretedFunction) for v in kernels):
        pytest.skip(f"{module.__name__}: " + _NOT_INTERPRETED, allow_module_level=True)
    return module


def fp8_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in e4m3 grid steps between two fp8 tensors (0 = same value; +0 and -0 equal)."""
    def ordinal(x: torch.Tensor) -> torch.Tensor:
        bits = x.contiguous().view(torch.uint8).to(torch.int32)
        mag = bits & 0x7F
        return torch.where(bits & 0x80 != 0, -mag, mag)

    return (ordinal(a) - ordinal(b)).abs()


def assert_fp8_close(out: torch.Tensor, ref: torch.Tensor, max_ulps: int = 1, atol: float = 0.0) -> None:
    """Each fp8 value within ``max_ulps`` grid steps of the reference, or within ``atol`` of it.

    One step: the float32 value before rounding differed in its last bits (a sum order, an
    ``exp``) and straddled a rounding boundary. ``atol`` (in the quantised domain, i.e. the
    kernel's own tolerance divided by the scale) covers kernels that compute in the model
    dtype, whose absolute error spans several of the fine fp8 steps near zero."""
    assert out.dtype == FP8_DTYPE and ref.dtype == FP8_DTYPE, (out.dtype, ref.dtype)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    dist = fp8_ulps(out, ref)
    bad = (dist > max_ulps) & ((out.float() - ref.float()).abs() > atol)
    assert not bool(bad.any()), (
        f"{int(bad.sum())} of {bad.numel()} fp8 values differ by more than {max_ulps} step(s) and {atol}; "
        f"e.g. {out.float()[bad][:4].tolist()} vs reference {ref.float()[bad][:4].tolist()}"
    )


def all_fp8_values() -> torch.Tensor:
    """Every finite e4m3 value, ascending, as float32."""
    vals = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
    return vals[~vals.isnan()].unique()


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
    ref = x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
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
    ref = (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    assert torch.equal(quant.static_scaled_fp8_quant_functional(x, s).view(torch.uint8), ref.view(torch.uint8))
    out = torch.empty_like(x, dtype=FP8_DTYPE)
    quant.static_scaled_fp8_quant(out, x, s)
    assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))


def test_static_quant_strided_input_and_output() -> None:
    x = torch.randn(6, 10) * 100
    s = torch.tensor(0.7)  # a 0-d scale is one element too
    ref = torch.ops.layerpass.static_scaled_fp8_quant_functional(x.t(), s)
    out = torch.empty(6, 10, dtype=FP8_DTYPE).t()  # non-contiguous result
    assert not out.is_contiguous()
    quant.static_scaled_fp8_quant(out, x.t(), s)
    assert torch.equal(out.contiguous().view(torch.uint8), ref.view(torch.uint8))


def test_static_quant_rejects_bad_input() -> None:
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="one-element scale"):
        quant.static_scaled_fp8_quant_functional(x, torch.ones(2))
    with pytest.raises(ValueError, match="result must be"):
        quant.static_scaled_fp8_quant(torch.empty(4, 8), x, torch.ones(1))
    with pytest.raises(ValueError, match="input must be"):
        quant.static_scaled_fp8_quant_functional(x.to(torch.int32), torch.ones(1))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
