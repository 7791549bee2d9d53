"""Set-up for the Triton kernel tests: kernels run on CPU tensors under the Triton interpreter.

Importing this module changes nothing. ``TRITON_INTERPRET=1`` is needed twice, and set only then:

- while a kernel module is imported, because ``@triton.jit`` decides at decoration time whether a
  function is interpreted: ``load_interpreted`` imports it inside ``interpreter_env()``;
- while a kernel runs, because the interpreter reads the variable again: the kernel test modules
  use the ``triton_interpreter`` fixture (``tests/ops/triton/conftest.py``), which holds
  ``interpreter_env()`` for the module's tests.

Where CUDA is present the calling module is skipped unless the caller set the variable, so that a
GPU run's other Triton kernels (Inductor's) stay compiled; without triton it is skipped too. The
kernels use none of triton's own ``@jit`` helpers (``tl.sum`` ...), so it does not matter whether
something imported triton earlier; if a kernel module itself was imported earlier without the
variable, ``load_interpreted`` skips.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

KERNEL_PACKAGE = "layerpass.ops.triton"
_NOT_INTERPRETED = (
    "the kernel module was imported before TRITON_INTERPRET=1 was set, so its kernels target a GPU "
    "and cannot run on CPU tensors; run the tests/ops/triton files in a fresh process"
)
_CUDA_PRESENT = (
    "CUDA is present: these CPU-tensor tests need the Triton interpreter process-wide; run them "
    "on their own with TRITON_INTERPRET=1 pytest tests/ops/triton"
)


def interpreter_wanted() -> bool:
    """Whether this process may use the interpreter: the caller asked for it, or there is no GPU
    whose compiled Triton kernels it would take over."""
    return os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()


@contextlib.contextmanager
def interpreter_env() -> Iterator[None]:
    """``TRITON_INTERPRET=1`` inside the block; the previous value (or its absence) after it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


def load_interpreted(name: str) -> ModuleType:
    """Import ``layerpass.ops.triton.<name>`` with its kernels interpreted; skips the calling module
    where that cannot be (no triton, a CUDA run that did not ask for the interpreter, the module
    already imported for a GPU)."""
    if not interpreter_wanted():
        pytest.skip(_CUDA_PRESENT, allow_module_level=True)
    triton = pytest.importorskip("triton", reason="triton is not installed (optional extra: pip install 'layerpass[triton]')")
    from triton.runtime.interpreter import InterpretedFunction

    from layerpass.ops.triton import interpreter_unusable

    unusable = interpreter_unusable()
    if unusable:
        pytest.skip(unusable, allow_module_level=True)

    with interpreter_env():
        module = importlib.import_module(f"{KERNEL_PACKAGE}.{name}")
    kernels = [v for v in vars(module).values() if isinstance(v, triton.runtime.JITFunction)]
    if any(not isinstance(v, InterpretedFunction) for v in kernels):
        pytest.skip(f"{module.__name__}: " + _NOT_INTERPRETED, allow_module_level=True)
    return module
