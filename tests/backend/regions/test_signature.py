"""``backend/regions/signature.py``: the structure a region must share with a layer it serves.

``layer_signature`` changes with what Dynamo's saved guards do not check: a submodule's class, a
submodule added, a parameter's shape or dtype, a callable or another object held as an attribute,
the training flag. It does not change with a scalar's or a ``str``'s value (the guards check those,
or the trace takes them as inputs), only with its type. ``module_lines(values=True)``, the
warm-start key's view, takes the values too. ``class_key`` names a class by name and source.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from layerpass.backend.regions.signature import class_key, layer_signature, module_lines


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.act = torch.relu
        self.eps, self.mode = 1e-6, "plain"


def _swap_class(layer: Layer) -> None:
    layer.norm = nn.RMSNorm(8)


def _add_submodule(layer: Layer) -> None:
    layer.extra = nn.Linear(8, 8)


def _reshape(layer: Layer) -> None:
    layer.lin = nn.Linear(8, 16)


def _retype(layer: Layer) -> None:
    layer.lin = nn.Linear(8, 8, dtype=torch.float64)


def _other_callable(layer: Layer) -> None:
    layer.act = torch.tanh


def _other_object(layer: Layer) -> None:
    layer.act = object()


def _int_for_float(layer: Layer) -> None:
    layer.eps = 1


def _training(layer: Layer) -> None:
    layer.norm.train(not layer.norm.training)


CHANGES: dict[str, Callable[[Layer], None]] = {
    "submodule class": _swap_class, "submodule added": _add_submodule, "parameter shape": _reshape,
    "parameter dtype": _retype, "callable": _other_callable, "object": _other_object,
    "attribute type": _int_for_float, "training flag": _training,
}


def test_identical_layers_have_one_signature() -> None:
    assert layer_signature(Layer()) == layer_signature(Layer())


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_structural_change_changes_the_signature(change: str) -> None:
    layer = Layer()
    CHANGES[change](layer)
    assert layer_signature(layer) != layer_signature(Layer()), change


def test_scalar_and_str_values_count_by_type_only() -> None:
    """The region's guards decide on values; the warm-start key's lines still hold them."""
    layer = Layer()
    layer.eps, layer.mode = 1e-5, "doubled"
    assert layer_signature(layer) == layer_signature(Layer())
    assert list(module_lines(layer, values=True)) != list(module_lines(Layer(), values=True))
    assert list(module_lines(layer, values=False)) == list(module_lines(Layer(), values=False))


def test_class_key_names_the_class_by_name_and_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An edit of the class's source changes its key; the same source gives the same key again."""
    module = tmp_path / "signature_probe.py"
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "signature_probe", raising=False)

    def key_of(body: str) -> str:
        module.write_text(f"from torch import nn\n\n\nclass Probe(nn.Module):\n    {body}\n")
        probe = importlib.reload(sys.modules["signature_probe"]) if "signature_probe" in sys.modules \
            else importlib.import_module("signature_probe")
        return class_key(probe.Probe)

    first = key_of("scale = 2")
    assert key_of("scale = 3.5") != first
    assert key_of("scale = 2") == first
    assert class_key(Layer) != first and class_key(Layer) == class_key(Layer)
