"""Triton kernels behind the ops' CUDA slots.

Each kernel module here imports ``triton`` at import time and holds wrappers with the exact
signature of the op they serve. This ``__init__`` imports neither triton nor those modules:
``register_triton_kernels()`` (run by ``layerpass.ops`` when triton is importable) registers,
for the CUDA dispatch key, a small trampoline per op that imports its kernel module on the
first CUDA call. So importing ``layerpass`` does not pay for triton, works without it, and
tests can set ``TRITON_INTERPRET=1`` before any kernel is decorated (``@triton.jit`` reads it
then). The torch kernels stay the CPU implementation.

The Triton interpreter (triton 3.9) mis-handles three things the kernels therefore avoid; see
``_common.py``: float32 -> fp8 casts (ties, carries, NaN), float32 -> bf16 casts (truncates),
and bf16 ``tl.dot`` (multiplies the storage integers).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

# op name -> (kernel module in this package, wrapper function)
TRITON_KERNELS: dict[str, tuple[str, str]] = {
    "static_scaled_fp8_quant": ("quant", "static_scaled_fp8_quant"),
    "static_scaled_fp8_quant_functional": ("quant", "static_scaled_fp8_quant_functional"),
    "rms_norm": ("norm_quant", "rms_norm"),
    "fused_add_rms_norm": ("norm_quant", "fused_add_rms_norm"),
    "rms_norm_static_fp8_quant": ("norm_quant", "rms_norm_static_fp8_quant"),
    "fused_add_rms_norm_static_fp8_quant": ("norm_quant", "fused_add_rms_norm_static_fp8_quant"),
    "silu_and_mul": ("activation", "silu_and_mul"),
    "silu_and_mul_static_fp8_quant": ("activation", "silu_and_mul_static_fp8_quant"),
    "unified_attention_with_output": ("attention", "unified_attention_with_output"),
    "moe_forward": ("moe", "moe_forward"),
    "moe_forward_shared": ("moe", "moe_forward_shared"),
    "linear_attention": ("linear_attention", "linear_attention_triton"),
}

_registered = False


def triton_available() -> bool:
    """Whether the optional ``triton`` package is installed (found without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _release(package: str) -> tuple[int, ...]:
    import importlib.metadata
    import re

    return tuple(int(n) for n in re.findall(r"\d+", importlib.metadata.version(package))[:2])


def interpreter_unusable() -> str | None:
    """Why the Triton interpreter (``TRITON_INTERPRET=1``, the CPU runs of the kernels) cannot run
    them here, or None. Compiled kernels on a GPU are not affected."""
    if not triton_available():
        return "triton is not installed (optional extra: pip install 'layerpass[triton]')"
    triton, numpy = _release("triton"), _release("numpy")
    if triton < (3, 7) and numpy >= (2, 4):  # its loop bounds go through int(1-element array)
        return (f"the Triton {'.'.join(map(str, triton))} interpreter fails under numpy {'.'.join(map(str, numpy))} "
                "(numpy 2.4 refuses int() of a 1-element array); use numpy<2.4 with it, or triton>=3.7")
    return None


def triton_kernel(op_name: str) -> Callable[..., Any]:
    """The Triton wrapper serving ``layerpass::<op_name>`` (imports its module, hence triton)."""
    if op_name not in TRITON_KERNELS:
        raise KeyError(f"no Triton kernel for layerpass op {op_name!r}; kernels exist for {sorted(TRITON_KERNELS)}")
    module, attr = TRITON_KERNELS[op_name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), attr)


def lazy_kernel(op_name: str) -> Callable[..., Any]:
    """A trampoline for ``op_name`` that resolves the Triton wrapper on its first call."""
    resolved: list[Callable[..., Any]] = []

    def kernel(*args: Any, **kwargs: Any) -> Any:
        if not resolved:
            resolved.append(triton_kernel(op_name))
        return resolved[0](*args, **kwargs)

    kernel.__name__ = kernel.__qualname__ = f"{op_name}_triton"
    return kernel


def register_triton_kernels() -> list[str]:
    """Register every Triton kernel for CUDA (once); returns the ops served, [] without triton."""
    global _registered
    if not triton_available():
        return []
    if not _registered:
        from ..library import register_cuda_kernel

        for op_name in TRITON_KERNELS:
            register_cuda_kernel(op_name, lazy_kernel(op_name))
        _registered = True
    return list(TRITON_KERNELS)


__all__ = ["TRITON_KERNELS", "lazy_kernel", "register_triton_kernels", "triton_available", "triton_kernel"]
