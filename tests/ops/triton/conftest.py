"""The Triton kernel tests run under the Triton interpreter (``tests/helpers/triton.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.triton import interpreter_env, interpreter_wanted


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter() -> Iterator[None]:
    """``TRITON_INTERPRET=1`` while this folder's tests run: the interpreter reads it again while a
    kernel runs (``load_interpreted`` sets it while the kernels are imported). Nothing is set on a
    CUDA run that did not ask for the interpreter: its kernel modules skip themselves."""
    if not interpreter_wanted():
        yield
        return
    with interpreter_env():
        yield
