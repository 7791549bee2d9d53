"""No-op elimination: reshapes/views that keep the shape, view-of-view chains, full slices.

A node is removed only when its output shape provably (static or symbolically known)
equals its input's; anything not provable is kept.
"""

from __future__ import annotations

import torch
from torch import fx
from torch._prims_common import is_contiguous_or_false
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .base import LayerpassPass

aten = torch.ops.aten
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SLICE = aten.slice.Tensor


def _val(node: object) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _contiguous(node: object) -> bool:
    v = _val(node)
    return v is not None and is_contiguous_or_false(v)  # no guard on unbacked sizes


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape))


class NoOpEliminationPass(LayerpassPass):
    name = "noop_elimination"

    def apply(self, graph: fx.Graph) -> int:
        removed = 0
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            if node.target in _VIEWS:
                src = node.args[0]
                # view(view(x, s1), s2) -> view(x, s2): the middle view is skipped. Only valid when
                # the outer op is a reshape (it copies if it must) or x is contiguous: a reshape in the
                # middle may have copied a non-contiguous x that a view of x itself cannot express.
                while isinstance(src, fx.Node) and src.target in _VIEWS and len(src.users) == 1 and (
                        node.target is aten.reshape.default or _contiguous(src.args[0])):
                    node.replace_input_with(src, src.args[0])
                    graph.erase_node(src)
                    src = node.args[0]
                    removed += 1
                out, inp = _val(node), _val(src)
                if out is not None and inp is not None and out.dtype == inp.dtype and _same_shape(out, inp) \
                        and (is_contiguous_or_false(inp) or node.target is aten.view.default):
                    node.replace_all_uses_with(src)
                    graph.erase_node(node)
                    removed += 1
            elif node.target is _SLICE:
                out, inp = _val(node), _val(node.args[0])
                step = node.args[4] if len(node.args) > 4 else node.kwargs.get("step", 1)
                if out is not None and inp is not None and step == 1 and _same_shape(out, inp):
                    node.replace_all_uses_with(node.args[0])
                    graph.erase_node(node)
                    removed += 1
        return removed
