"""``backend/layer_container.py``: one rule for which list holds the decoder layers, and the model
reader (regions, the doctor's regions) and the graph reader (the split, the doctor's pieces) agree.

Cases where the two old rules disagreed: a shallow list of two beside a deeper list of four
(breadth-first took the shallow one), and an ``nn.Sequential`` of three beside a ``ModuleList``
of two layers (the graph rule took the Sequential, which regions never take).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerpass.backend import layer_container
from layerpass.backend.regions.router import find_layer_container as regions_container
from layerpass.backend.pieces.split import find_layer_container as split_container
from tests.helpers import backend as bh


class ShallowPairDeepStack(nn.Module):
    """Two heads at the root, four decoder layers one level down: the four are the layers."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(3, 3) for _ in range(2))
        self.body = bh.Stack(4)  # its head gives 3 features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x)
        return sum(h(x) for h in self.heads)


class SequentialBeside(nn.Module):
    """A called ``nn.Sequential`` of three and a ``ModuleList`` of two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.layers = nn.ModuleList(bh.Block(8) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        for layer in self.layers:
            x = layer(x)
        return x


def _graph_path(path: str | None) -> str | None:
    """The graph's path without Dynamo's root (``L['self'].layers`` -> ``layers``)."""
    if path is None:
        return None
    return path.split(".", 1)[1] if path.startswith("L[") and "." in path else ""


@pytest.mark.parametrize(("model", "expected"), [
    (lambda: bh.Stack(3), "layers"),
    (bh.HeadsModel, "layers"),
    (ShallowPairDeepStack, "body.layers"),
    (SequentialBeside, "layers"),
    (lambda: nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), None),
])
def test_model_and_graph_readers_name_the_same_container(model, expected) -> None:
    m = model().eval()
    found = layer_container.in_model(m)
    assert (None if found is None else found[0]) == expected
    assert regions_container(m) is (None if found is None else m.get_submodule(expected))
    gm, _ = bh.dynamo_graph(m, torch.randn(3, 8))
    assert _graph_path(split_container(gm)) == expected


def test_the_rule_most_modules_then_shallowest_then_first() -> None:
    assert layer_container.choose([("a", 2), ("b.layers", 4)]) == "b.layers"
    assert layer_container.choose([("a.x", 3), ("b", 3)]) == "b"  # shallowest
    assert layer_container.choose([("a", 3), ("b", 3)]) == "a"  # first
    assert layer_container.choose([("layers", 3), ("layers.0.heads", 8)]) == "layers"  # never a nested list
    assert layer_container.choose([("layers", 1), ("x", 0)]) is None
