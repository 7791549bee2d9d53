"""``saveable_guards``: programs whose guards torch 2.13 saves but cannot load round-trip inside it.

Each case is a torch-only module showing one gap in torch's guard-state pickler (see
``backend/regions/guard_pickling.py``): a module attribute holding ``torch.float32``, a decorated forward
whose closure constants are guarded, a method bound in an instance's ``__dict__``, parameters
holding ``.grad`` (a model that trained). Each is
traced with ``aot_compile`` inside the block (``aot_eager``: no Inductor), saved, loaded, run
and guard-checked, as the warm start does. The closure case also checks that the loaded guards
compare the live closure with the value seen at trace time (a flipped constant fails the guard).
How the patch is installed (nesting, threads) is tested in ``test_torch_patches.py``.
"""

from __future__ import annotations

import functools
import io
import os
import tempfile
import types

import pytest
import torch
from torch import nn

from layerpass.backend.regions.guard_pickling import applies
from layerpass.backend.regions.torch_patches import saveable_guards
from layerpass.backend.regions.warm_start import _forward_chain  # the warm start's own: what it saves by reference
from layerpass.torch_compat import TORCH_VERSION, compile_for_regions, has_aot_api

pytestmark = [
    pytest.mark.skipif(not has_aot_api() or not applies(),
                       reason="needs torch's aot_compile and its guard-state pickler (torch 2.10+)"),
    # these round trips trace with backend="aot_eager"; layerpass's own backend saves on 2.11 too
    pytest.mark.skipif(TORCH_VERSION < (2, 12), reason="torch 2.11's aot_compile saves only an Inductor "
                       "OutputCode or a SerializableCallable, not aot_eager's plain function"),
]


def _flagged(flag: bool):
    """A ``functools.wraps`` decorator with a constant in its closure that the trace reads
    (like transformers' ``deprecate_kwarg``)."""

    def deco(func):
        @functools.wraps(func)
        def wrapper(self, x):
            return func(self, x) * 2 if flag else func(self, x)

        return wrapper

    return deco


def _outer(forward):
    """A plain pass-through wrapper (like transformers' ``GradientCheckpointingLayer``): the
    function it wraps becomes a closure variable, i.e. a local, of the traced frame."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        return forward(self, *args, **kwargs)

    return wrapper


class DtypeLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.params_dtype = torch.float32  # never read by forward: torch records it as missing, by id

    def forward(self, x):
        return self.lin(x)


class WrappedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    @_outer
    @_flagged(False)
    def forward(self, x):
        return self.lin(x)


class FlippedLayer(WrappedLayer):  # same code, the guarded closure constant flipped
    @_outer
    @_flagged(True)
    def forward(self, x):
        return self.lin(x)


class Child(nn.Module):
    def forward(self, x):
        return x + 1


class BoundLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.child = Child()
        # an instance override of a submodule's forward (as models/hf/hub_kernels.py binds)
        self.child.forward = types.MethodType(_flagged(False)(Child.forward), self.child)

    def forward(self, x):
        return self.child(x)


class TrainedLayer(nn.Module):
    """Took a training step: its parameters hold ``.grad`` (no guard reads them)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        with torch.enable_grad():
            self.lin(torch.randn(2, 4)).sum().backward()

    def forward(self, x):
        return self.lin(x)


def _save(layer: nn.Module, x: torch.Tensor) -> bytes:
    """The traced forward of ``layer``, saved with torch's public API (``save_compiled_function``)."""
    fn = compile_for_regions(type(layer).forward, fullgraph=True, backend="aot_eager")
    with saveable_guards():
        aot = fn.aot_compile(((layer, x), {}))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "fn.bin")
        aot.save_compiled_function(path, _forward_chain(type(layer)))
        with open(path, "rb") as f:
            return f.read()


def _load(data: bytes, cls: type):
    """``torch.compiler.load_compiled_function`` of ``data`` for layer class ``cls``."""
    return torch.compiler.load_compiled_function(io.BytesIO(data), external_data=_forward_chain(cls))


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():  # traced and run in one grad mode (the global-state guard checks it)
        yield


@pytest.mark.parametrize("cls", [DtypeLayer, WrappedLayer, BoundLayer, TrainedLayer])
def test_round_trip(cls: type) -> None:
    torch.manual_seed(0)
    layer, x = cls().eval(), torch.randn(3, 4)
    loaded = _load(_save(layer, x), cls)
    torch.testing.assert_close(loaded(layer, x), layer(x))
    assert loaded.guard_check(layer, torch.randn(3, 4))
    assert not loaded.guard_check(layer, torch.randn(3, 4, dtype=torch.float64))  # the guards are live


def test_gradients_are_left_out_and_left_alone() -> None:
    """Before: a parameter's ``.grad`` was pickled as ``_Missing``, and the program could not be saved."""
    layer = TrainedLayer().eval()
    grad = layer.lin.weight.grad
    before = grad.clone()
    _load(_save(layer, torch.randn(3, 4)), TrainedLayer)
    assert layer.lin.weight.grad is grad and torch.equal(grad, before)


def test_a_model_that_trained_warm_starts(tmp_path) -> None:
    """One training step, then ``.eval()`` for serving: the regions are saved and a new compile loads them."""
    import layerpass
    from layerpass.backend.config import CompilationConfig
    from tests.helpers import backend as bh

    model = bh.Stack(3)
    with torch.enable_grad():
        model(torch.randn(4, 8)).sum().backward()
    model.eval()
    x = torch.randn(4, 8)
    statuses = []
    for _ in range(2):
        compiled = layerpass.compile(model, CompilationConfig(cache_dir=str(tmp_path)))
        torch.testing.assert_close(compiled(x), model(x))
        statuses.append(layerpass.last_compile_report().warm_start)
    assert not statuses[0].startswith("off") and statuses[1] == "loaded", statuses


def test_closure_constants_are_compared_with_the_traced_values() -> None:
    """The wrapped forward is saved by value: on load its guards hold the traced closure constant,
    so a live forward whose constant differs (another library version) fails them."""
    torch.manual_seed(0)
    layer, x = WrappedLayer().eval(), torch.randn(3, 4)
    data = _save(layer, x)
    assert _load(data, WrappedLayer).guard_check(layer, x)
    assert not _load(data, FlippedLayer).guard_check(layer, x)
