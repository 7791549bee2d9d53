"""Static per-tensor FP8 (e4m3) quantisation and the FP8 matmul."""

from __future__ import annotations

import torch

from .library import layerpass_op, sizes_differ

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Reference: divide by the per-tensor scale, saturate to +-448, cast to fp8."""
    return (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _values_readable(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s value is free: a plain CPU tensor (not fake, not a functorch
    wrapper), outside tracing.

    Scale values are checked by the eager entry points only (a fake kernel cannot see them, and
    the real kernels check nothing); a CUDA scale is never read (that would sync the device): a
    layer's scales are checked where they enter, at layer construction and weight loading."""
    return (type(t) in _PLAIN_TENSORS and t.device.type == "cpu" and not torch.compiler.is_compiling()
            and not torch._C._functorch.is_functorch_wrapped_tensor(t))


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_INF = float("inf")


def check_scale_value(scale: torch.Tensor, what: str) -> None:
    """A static FP8 scale is finite and > 0 (0 saturates, a negative one flips signs, NaN / inf
    poison the output); ``what`` names it (``"layer 'x': input_scale"``, ``"scaled_fp8_mm: scale_a"``)."""
    if scale.numel() == 1:
        v = scale.item()
        if v > 0 and v != _INF:  # False for NaN
            return
    bad = [v for v in scale.detach().float().reshape(-1).tolist() if not (v > 0 and v != _INF)]
    if bad:
        raise ValueError(f"{what} must be finite and > 0 (a static per-tensor FP8 scale: value / scale is cast "
                         f"to fp8), got {bad[0]}")


def _check_scale(scale: torch.Tensor, what: str = "FP8 scale") -> None:
    """One element; on CPU also a finite, positive value (see ``_values_readable``)."""
    if sizes_differ(scale.numel(), 1):
        raise ValueError(f"static per-tensor FP8 needs a one-element scale, got shape {tuple(scale.shape)}")
    if _values_readable(scale):
        check_scale_value(scale, what)


def _check_float_input(op: str, input: torch.Tensor) -> None:
    if not input.is_floating_point() or input.dtype == FP8_DTYPE:
        raise ValueError(f"{op}: input must be fp16/bf16/fp32 (the value to quantise), got {input.dtype}")


def check_quant_out(result: torch.Tensor, input: torch.Tensor, scale: torch.Tensor) -> None:
    """Argument checks of the out-variant quant (shared by the CPU op and the Triton kernel)."""
    _check_scale(scale, "static_scaled_fp8_quant: scale")
    _check_float_input("static_scaled_fp8_quant", input)
    if sizes_differ(result.shape, input.shape) or result.dtype != FP8_DTYPE:
        raise ValueError(
            f"static_scaled_fp8_quant: result must be {FP8_DTYPE} of shape {tuple(input.shape)}, "
            f"got {result.dtype} of shape {tuple(result.shape)}"
        )


def check_quant_functional_args(input: torch.Tensor, scale: torch.Tensor) -> None:
    """Argument checks of the functional quant."""
    _check_scale(scale, "static_scaled_fp8_quant_functional: scale")
    _check_float_input("static_scaled_fp8_quant_functional", input)


def check_scaled_mm_args(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor) -> None:
    """Argument checks of ``scaled_fp8_mm`` (scale values only where readable, see ``_values_readable``)."""
    if a.dtype != FP8_DTYPE or b.dtype != FP8_DTYPE:
        raise ValueError(f"scaled_fp8_mm takes {FP8_DTYPE} operands, got {a.dtype} and {b.dtype}")
    if b.dim() != 2 or a.dim() < 1:
        raise ValueError(f"scaled_fp8_mm: a must be [..., K] and the weight b 2-D [N, K], got {tuple(a.shape)} and {tuple(b.shape)}")
    if sizes_differ(a.shape[-1], b.shape[1]):
        raise ValueError(f"scaled_fp8_mm: a [..., {a.shape[-1]}] does not match weight [N, {b.shape[1]}]")
    for name, scale in (("scale_a", scale_a), ("scale_b", scale_b)):
        if _values_readable(scale):
            check_scale_value(scale, f"scaled_fp8_mm: {name}")


# Each op: its check (run by the fake kernel at trace time), a CPU kernel that does not check, and
# the entry point layers call, which checks in eager (see ``ops/norm.py``'s docstring).


def _quantized(result: torch.Tensor, input: torch.Tensor, scale: torch.Tensor) -> tuple[None, torch.Tensor]:
    """``static_scaled_fp8_quant``'s native code, functional: its return (none), then ``result``'s new value."""
    return None, quantize_fp8(input, scale)


@layerpass_op("static_scaled_fp8_quant", mutates_args=("result",), fake=lambda result, input, scale: None,
              check=check_quant_out, native=_quantized, lowers=True)
def _static_scaled_fp8_quant_kernel(result: torch.Tensor, input: torch.Tensor, scale: torch.Tensor) -> None:
    result.copy_(_quantized(result, input, scale)[1])


def static_scaled_fp8_quant(result: torch.Tensor, input: torch.Tensor, scale: torch.Tensor) -> None:
    """Out-variant: ``result`` (fp8, same shape as ``input``) <- quantize(input / scale)."""
    if not torch.compiler.is_compiling():
        check_quant_out(result, input, scale)
    torch.ops.layerpass.static_scaled_fp8_quant(result, input, scale)


@layerpass_op("static_scaled_fp8_quant_functional", fake=lambda input, scale: torch.empty_like(input, dtype=FP8_DTYPE),
              check=check_quant_functional_args, lowers=True)
def _static_scaled_fp8_quant_functional_kernel(input: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return quantize_fp8(input, scale)


def static_scaled_fp8_quant_functional(input: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Functional form of ``static_scaled_fp8_quant``: returns the fp8 tensor."""
    if not torch.compiler.is_compiling():
        check_quant_functional_args(input, scale)
    return torch.ops.layerpass.static_scaled_fp8_quant_functional(input, scale)


def _mm_fake(a, b, scale_a, scale_b, out_dtype, bias=None):
    return a.new_empty((*a.shape[:-1], b.shape[0]), dtype=out_dtype)


def _check_scaled_fp8_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                         out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> None:
    check_scaled_mm_args(a, b, scale_a, scale_b)


@layerpass_op("scaled_fp8_mm", fake=_mm_fake, check=_check_scaled_fp8_mm, lowers=True)
def _scaled_fp8_mm_kernel(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    out = torch.matmul(a.float(), b.float().t()) * (scale_a.float() * scale_b.float())
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def scaled_fp8_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                  out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``(a @ b.T) * scale_a * scale_b (+ bias)``: fp8 ``a [..., K]``, fp8 weight ``b [N, K]``."""
    if not torch.compiler.is_compiling():
        check_scaled_mm_args(a, b, scale_a, scale_b)
    return torch.ops.layerpass.scaled_fp8_mm(a, b, scale_a, scale_b, out_dtype, bias)
