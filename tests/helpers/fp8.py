"""The tests' one set of FP8 constants and comparisons (e4m3, what every layerpass FP8 op uses).

Written from the format's definition, not from layerpass: ``FP8_MAX`` is e4m3's largest finite
value (448), a grid step is one code of the 8-bit encoding.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
assert torch.finfo(FP8).max == FP8_MAX


def fp8_bits(x: torch.Tensor) -> torch.Tensor:
    """fp8 tensors compared bit for bit (CPU has no fp8 arithmetic for ``==``)."""
    assert x.dtype == FP8, x.dtype
    return x.view(torch.uint8)


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
    assert out.dtype == FP8 and ref.dtype == FP8, (out.dtype, ref.dtype)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    dist = fp8_ulps(out, ref)
    bad = (dist > max_ulps) & ((out.float() - ref.float()).abs() > atol)
    assert not bool(bad.any()), (
        f"{int(bad.sum())} of {bad.numel()} fp8 values differ by more than {max_ulps} step(s) and {atol}; "
        f"e.g. {out.float()[bad][:4].tolist()} vs reference {ref.float()[bad][:4].tolist()}"
    )


def all_fp8_values() -> torch.Tensor:
    """Every finite e4m3 value, ascending, as float32."""
    vals = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    return vals[~vals.isnan()].unique()


def fp8_model_tolerance(ref: torch.Tensor) -> dict[str, float]:
    """Tolerance of an FP8 model's logits vs another FP8 model's: e4m3 has ~6% relative rounding, so
    one flipped rounding in a layer moves logits by a few percent of their spread."""
    spread = float(ref.abs().max())
    return {"atol": 0.1 * spread + 1e-3, "rtol": 0.1}
