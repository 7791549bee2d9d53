"""Split a Dynamo graph into pieces with ``torch.fx.passes.split_module``.

- ``"layers"``: one piece per repeated decoder layer (children of the container
  ``backend/layer_container.py`` reads from each node's ``nn_module_stack``: the rule regions
  use), plus a prologue and an epilogue; a layer's own list of heads or experts is never taken
  for the layers.
  With ``whole_layer=True`` (the graph is one decoder layer, a region of ``layerpass.compile``)
  the graph is one piece: nothing inside a layer is a layer.
- ``"ops"``: cut around each splitting op; the op is a piece of its own that runs eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx
from torch.fx.passes.split_module import split_module

from layerpass.ops.library import op_name

from .. import layer_container


@dataclass
class SplitResult:
    graph_module: fx.GraphModule  # calls submod_<n> in order
    piece_layers: dict[str, int | None]  # submodule name -> decoder-layer index
    eager_pieces: set[str]  # submodule names that run eagerly (splitting ops)
    layer_container: str | None = None


def find_layer_container(gm: fx.GraphModule) -> str | None:
    """The decoder layers' container path in ``gm`` (``backend/layer_container.py``: the one rule,
    shared with regions and the doctor)."""
    return layer_container.in_graph(gm)


def split_whole(gm: fx.GraphModule) -> SplitResult:
    """The whole graph as one piece (``submod_0``, no layer index)."""
    split = split_module(gm, None, lambda n: 0, keep_original_order=True)
    return SplitResult(split, {name: None for name, _ in split.named_children()}, set(), None)


def split_by_layers(gm: fx.GraphModule) -> SplitResult:
    container = find_layer_container(gm)
    compute = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    layer_of: dict[fx.Node, int | None] = {}
    for node in compute:
        idx = [i for parent, i in layer_container.indexed_paths(node) if parent == container]
        layer_of[node] = idx[0] if idx else None
    layer_nodes = [n for n in compute if layer_of[n] is not None]
    if container is None or not layer_nodes:
        part = {n: 0 for n in compute}
        piece_layers = {"submod_0": None}
    else:
        first, last = compute.index(layer_nodes[0]), compute.index(layer_nodes[-1])
        order = sorted({layer_of[n] for n in layer_nodes})
        rank = {layer: r + 1 for r, layer in enumerate(order)}  # 0 = prologue, len+1 = epilogue
        part = {}
        pending: list[fx.Node] = []
        for pos, node in enumerate(compute):
            if pos < first:
                part[node] = 0
            elif pos > last:
                part[node] = len(order) + 1
            elif layer_of[node] is None:
                pending.append(node)  # glue between layers joins the next layer
            else:
                current = rank[layer_of[node]]
                if part and current < max(part.values()):
                    current = max(part.values())  # keep partitions monotone in graph order
                for p in pending:
                    part[p] = current
                pending.clear()
                part[node] = current
        inv = {r: layer for layer, r in rank.items()}
        piece_layers = {f"submod_{r}": inv.get(r) for r in set(part.values())}
    split = split_module(gm, None, lambda n: part[n], keep_original_order=True)
    names = {name for name, _ in split.named_children()}
    return SplitResult(split, {k: v for k, v in piece_layers.items() if k in names}, set(), container)


def split_by_ops(gm: fx.GraphModule, splitting_ops: tuple[str, ...]) -> SplitResult:
    part: dict[fx.Node, int] = {}
    current = 0
    eager: set[int] = set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "call_function" and op_name(node.target) in splitting_ops:
            current += 1
            part[node] = current
            eager.add(current)
            current += 1
        else:
            part[node] = current
    split = split_module(gm, None, lambda n: part[n], keep_original_order=True)
    names = {name for name, _ in split.named_children()}
    return SplitResult(split, {n: None for n in names}, {f"submod_{i}" for i in eager} & names)


def split_graph(gm: fx.GraphModule, split: str, splitting_ops: tuple[str, ...], whole_layer: bool = False) -> SplitResult:
    """The split a ``CompilationConfig`` asks for (``split`` is ``"layers"`` or ``"ops"``).

    ``whole_layer``: ``gm`` is one decoder layer (a region), so ``"layers"`` gives one piece."""
    if split != "layers":
        return split_by_ops(gm, splitting_ops)
    return split_whole(gm) if whole_layer else split_by_layers(gm)
