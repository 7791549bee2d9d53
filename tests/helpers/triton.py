"""Set-up for the Triton kernel tests: kernels run on CPU tensors under the Triton interpreter.

``@triton.jit`` decides at decoration time whether a function is interpreted, and the
interpreter reads ``TRITON_INTERPRET`` again while a kernel runs; so importing this module sets
the variable, before the kernel modules are imported, and leaves it set for the test process (a
CPU tensor can only run through the interpreter anyway). Where CUDA is present the importing
test module is skipped unless the caller set it, so that a GPU run's other Triton kernels
(Inductor's) stay compiled; without triton it is skipped too. The kernels use none of triton's
own ``@jit`` helpers (``tl.sum`` ...), so it does not matter whether something imported triton
earlier; if a kernel module itself was imported earlier without the variable, ``load_interpreted``
skips.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    if torch.cuda.is_available():  # keep the interpreter away from a GPU run's compiled kernels
        pytest.skip(
            "CUDA is present: these CPU-tensor tests need the Triton interpreter process-wide; run them "
            "on their own with TRITON_INTERPRET=1 pytest tests/ops/triton", allow_module_level=True,
        )
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton", reason="triton is not installed (optional extra: pip install 'layerpass[triton]')")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

KERNEL_PACKAGE = "layerpass.ops.triton"
_NOT_INTERPRETED = (
    "the kernel module was imported before TRITON_INTERPRET=1 was set, so its kernels target a GPU "
    "and cannot run on CPU tensors; run the tests/ops/triton files in a fresh process"
)


def load_interpreted(name: str) -> ModuleType:
    """Import ``layerpass.ops.triton.<name>``, skipping the calling module if its kernels target a GPU."""
    module = importlib.import_module(f"{KERNEL_PACKAGE}.{name}")
    kernels = [v for v in vars(module).values() if isinstance(v, triton.runtime.JITFunction)]
    if any(not isinstance(v, InterpretedFunction) for v in kernels):
        pytest.skip(f"{module.__name__}: " + _NOT_INTERPRETED, allow_module_level=True)
    return module
