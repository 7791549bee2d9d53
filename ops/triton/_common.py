"""Helpers shared by the Triton kernels: exact FP8 (e4m3) encoding and launch sizing.

The kernels never rely on Triton's float32 -> fp8 cast. The CPU reference is
``(x / scale).clamp(-448, 448).to(float8_e4m3fn)`` (round to nearest, ties to even, NaN kept),
and the Triton interpreter's cast (triton 3.9) rounds ties away from zero, drops the carry
when the mantissa rounds up (124.0 -> 64.0) and turns NaN into 384. So ``fp8_round`` rounds
onto the e4m3 grid in float32 and ``fp8_e4m3_bits`` encodes the byte itself; kernels store
those bytes through a ``uint8`` view of the fp8 output (``as_fp8_bytes``). The result is bit
identical to the reference on the interpreter and on the GPU alike. Likewise ``cast_rne``
rounds float32 -> bf16 by hand, because the interpreter's cast truncates, and ``dot_f32acc``
widens bf16 ``tl.dot`` operands on CPU tensors, because the interpreter's bf16 dot is wrong.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant import FP8_DTYPE, FP8_MAX

# Reductions and scans call ``tl.reduce`` / ``tl.associative_scan`` with triton's own combine
# functions instead of ``tl.sum`` / ``tl.max`` / ``tl.cumsum`` (and ``tl.full`` instead of
# ``tl.zeros``). Those wrappers are ``@jit`` functions of triton's standard library, fixed as
# compiled or interpreted when ``triton`` is first imported, so a kernel calling them cannot
# run on the interpreter in a process that imported triton earlier (importing torch._inductor
# does). The combine functions are never called by the interpreter: it recognises them by
# identity and reduces with numpy; compiled, this is exactly what ``tl.sum`` etc. expand to.
@triton.jit
def reduce_sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def reduce_max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def cumsum(x, axis: tl.constexpr):
    return tl.associative_scan(x, axis, tl.standard._sum_combine)


@triton.jit
def fp8_round(x):
    """Saturate float32 ``x`` to +-448 and round it onto the e4m3 grid (RNE, signed zero kept)."""
    # like torch.clamp, NaN stays NaN (and encodes as the fp8 NaN)
    x = tl.maximum(x, -448.0, propagate_nan=tl.PropagateNan.ALL)
    x = tl.minimum(x, 448.0, propagate_nan=tl.PropagateNan.ALL)
    bits = x.to(tl.int32, bitcast=True)
    # e4m3: 3 mantissa bits, smallest normal exponent -6 (subnormals share its 2**-9 step).
    exp = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    step = ((exp - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2**(exp-3), exact
    inv_step = ((3 - exp + 127) << 23).to(tl.float32, bitcast=True)  # 2**(3-exp): scaling is exact
    # |x| / step < 16; adding and removing 1.5 * 2**23 rounds it to an integer, ties to even
    # (IEEE round-to-nearest-even of the fp32 addition, the same on numpy and on the GPU).
    r = ((tl.abs(x) * inv_step + 12582912.0) - 12582912.0) * step
    # ``* -1.0``, not unary minus: Triton 3.6 lowers ``-r`` to ``0.0 - r`` (compiled and interpreted
    # alike), which turns the -0.0 of a tiny negative input into +0.0; the product keeps the sign.
    return tl.where(bits < 0, r * -1.0, r)


@triton.jit
def cast_rne(x, dtype: tl.constexpr):
    """float32 ``x`` -> ``dtype``, rounding to nearest even like torch's ``.to``.

    bf16 is rounded by hand: the interpreter's float32 -> bf16 cast truncates."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))
    return x.to(dtype)


@triton.jit
def fp8_e4m3_bits(x):
    """The float8_e4m3fn byte of saturated, RNE-rounded float32 ``x`` (NaN -> 0x7F)."""
    r = fp8_round(x)
    bits = r.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = tl.abs(r)
    exp = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    normal = ((exp + 7) << 3) | ((a.to(tl.int32, bitcast=True) >> 20) & 0x7)  # bias 7, top 3 mantissa bits
    subnormal = (tl.where(a < 0.015625, a, 0.0) * 512.0).to(tl.int32)  # k * 2**-9 below 2**-6: k = 0..7
    mag = tl.where(exp >= -6, normal, subnormal)
    mag = tl.where(r != r, 0x7F, mag)
    return (sign | mag).to(tl.uint8)


@triton.jit
def quantize_fp8_value(y, scale):
    """The fp8 byte of ``y / scale`` (IEEE-exact division, like torch's); store it to a uint8 view."""
    return fp8_e4m3_bits(tl.math.div_rn(y, scale))


def as_fp8_bytes(t: torch.Tensor) -> torch.Tensor:
    """The ``uint8`` view of an fp8 tensor that the kernels store encoded bytes into."""
    return t.view(torch.uint8) if t.dtype == FP8_DTYPE else t


# ``dot_f32acc`` modes, picked on the host by ``dot_mode``.
DOT_NATIVE, DOT_IEEE, DOT_UPCAST = 0, 1, 2


@triton.jit
def dot_f32acc(a, b, MODE: tl.constexpr):
    """``a @ b`` accumulated in float32.

    ``DOT_NATIVE``: fp16/bf16 operands as they are (tensor cores); ``DOT_IEEE``: float32
    operands without TF32 (the reference is exact float32); ``DOT_UPCAST``: bf16 operands
    widened to float32 first, because the interpreter's bf16 ``tl.dot`` multiplies the raw
    storage integers (triton 3.9). The widening is exact, so the result is the same."""
    if MODE == 1:
        c = tl.dot(a, b, input_precision="ieee")
    elif MODE == 2:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


def dot_mode(dtype: torch.dtype, device: torch.device) -> int:
    """The ``dot_f32acc`` mode for operands of ``dtype`` (CPU tensors only run on the interpreter)."""
    if dtype == torch.float32:
        return DOT_IEEE
    if dtype == torch.bfloat16 and device.type == "cpu":
        return DOT_UPCAST
    return DOT_NATIVE


def row_block(n: int, cap: int = 4096) -> int:
    """Power-of-two tile covering a row of ``n`` elements, at most ``cap`` (the kernels loop)."""
    return min(triton.next_power_of_2(max(n, 1)), cap)


def dot_block(n: int) -> int:
    """Tile for a ``tl.dot`` dimension: a power of two, and >= 16 (the compiled minimum)."""
    return max(16, triton.next_power_of_2(max(n, 1)))


def scale_as_f32(scale: torch.Tensor) -> torch.Tensor:
    """A one-element float32 view of a static per-tensor scale (the kernels load one scalar)."""
    return scale.reshape(1).to(torch.float32)


__all__ = [
    "FP8_DTYPE", "FP8_MAX", "as_fp8_bytes", "cast_rne", "fp8_e4m3_bits", "fp8_round", "quantize_fp8_value", "row_block", "dot_block", "scale_as_f32",
    "DOT_NATIVE", "DOT_IEEE", "DOT_UPCAST", "dot_f32acc", "dot_mode", "cumsum", "reduce_max", "reduce_sum",
]
