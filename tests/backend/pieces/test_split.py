"""``backend/pieces/split.py`` on Dynamo graphs (no Inductor: cheap).

- ``"layers"``: one piece per decoder layer (the outermost repeated ``ModuleList``, never a layer's
  own list of heads), a prologue and an epilogue, named ``submod_<n>`` in graph order; identical
  layers give structurally identical pieces; ``whole_layer`` (a region) is one piece.
- ``"ops"``: each splitting op is an eager piece of its own, between compiled pieces.
- Every split graph computes what the original graph computes.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from layerpass.backend.pieces.split import find_layer_container, split_by_layers, split_by_ops, split_graph
from tests.helpers import backend as bh


def submodules(result) -> list[str]:
    return [name for name, _ in result.graph_module.named_children()]


@settings(max_examples=5, deadline=None)
@given(layers=st.integers(2, 5), tokens=st.integers(2, 6))
def test_split_by_layers_on_a_toy_stack(layers: int, tokens: int) -> None:
    model = bh.Stack(layers, seed=layers).eval()
    x = torch.randn(tokens, 8)
    gm, inputs = bh.dynamo_graph(model, x)
    assert find_layer_container(gm).endswith("layers")
    result = split_by_layers(gm)
    # prologue (inp), one piece per layer, epilogue (out): named in graph order
    assert submodules(result) == [f"submod_{i}" for i in range(layers + 2)]
    assert result.piece_layers == {"submod_0": None, **{f"submod_{i + 1}": i for i in range(layers)},
                                   f"submod_{layers + 1}": None}
    assert result.eager_pieces == set() and result.layer_container == find_layer_container(gm)
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(*inputs)[0], model(x))
    keys = bh.layer_piece_keys(result, inputs)
    assert sorted(keys) == list(range(layers)) and len(set(keys.values())) == 1, "identical layers, one key"


def test_nested_module_lists_split_on_the_outer_list() -> None:
    """A layer's list of heads (4 indices) must not beat the 3 decoder layers: pieces name layers."""
    model, x = bh.HeadsModel().eval(), torch.randn(5, 8)
    gm, inputs = bh.dynamo_graph(model, x)
    container = find_layer_container(gm)
    assert container is not None and container.endswith("layers"), container
    result = split_by_layers(gm)
    assert sorted(v for v in result.piece_layers.values() if v is not None) == [0, 1, 2]
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(*inputs)[0], model(x))
    keys = bh.layer_piece_keys(result, inputs)
    assert sorted(keys) == [0, 1, 2] and len(set(keys.values())) == 1, keys


class TwoLinears(nn.Module):
    """No indexed submodules at all."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


def test_a_graph_without_repeated_layers_is_one_piece() -> None:
    gm, _ = bh.dynamo_graph(TwoLinears().eval(), torch.randn(3, 8))
    assert find_layer_container(gm) is None
    result = split_by_layers(gm)
    assert submodules(result) == ["submod_0"] and result.piece_layers == {"submod_0": None}


def test_whole_layer_is_one_piece_even_with_repeated_lists_inside() -> None:
    """A region's graph is one decoder layer: its own list of heads is not split into pieces."""
    layer, x = bh.HeadsLayer().eval(), torch.randn(5, 8)
    gm, inputs = bh.dynamo_graph(layer, x)
    assert find_layer_container(gm) is not None  # the heads would be taken for layers
    result = split_graph(gm, "layers", (), whole_layer=True)
    assert submodules(result) == ["submod_0"] and result.piece_layers == {"submod_0": None}
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(*inputs)[0], layer(x))


def test_split_by_ops_isolates_the_splitting_op() -> None:
    model = bh.Stack(3).eval()
    x = torch.randn(4, 8)
    gm, inputs = bh.dynamo_graph(model, x)
    result = split_by_ops(gm, ("aten.relu",))
    assert len(result.eager_pieces) == 3  # one relu per layer
    names = submodules(result)
    assert names == [f"submod_{i}" for i in range(7)]  # compiled and eager pieces alternate
    assert result.eager_pieces == {"submod_1", "submod_3", "submod_5"}
    for name in result.eager_pieces:
        nodes = [n for n in getattr(result.graph_module, name).graph.nodes if n.op == "call_function"]
        assert len(nodes) == 1 and "relu" in str(nodes[0].target)
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(*inputs)[0], model(x))


@pytest.mark.parametrize("whole_layer", [False, True])
def test_split_graph_ops_mode_cuts_at_the_named_ops_only(whole_layer: bool) -> None:
    """``split="ops"`` cuts at the configured ops, in a region too; an op not in the graph cuts nothing."""
    gm, _ = bh.dynamo_graph(bh.Stack(2).eval(), torch.randn(4, 8))
    assert split_graph(gm, "ops", ("aten.relu",), whole_layer=whole_layer).eager_pieces == {"submod_1", "submod_3"}
    untouched = split_graph(gm, "ops", ("aten.tanh",), whole_layer=whole_layer)
    assert untouched.eager_pieces == set() and submodules(untouched) == ["submod_0"]
