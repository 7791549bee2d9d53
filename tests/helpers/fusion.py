"""Helpers for the fusion / clean-up pass tests (``tests/test_fusion_*.py`` and friends).

Two ways to get the graphs the passes see:

- ``capture_graph``: Dynamo + AOT autograd with Inductor's decompositions and v1
  ``auto_functionalized`` (what the layerpass backend configures), stopping BEFORE Inductor's
  code generation. The captured forward graph has the post-grad shape the patterns are written
  for (layer names are placeholders), costs well under a second, and can be run eagerly before
  and after a pass, so hypothesis can vary shapes cheaply.
- ``compile_recorded``: a full ``layerpass.compile`` of a zoo model with a ``RecordingPass``
  added last to the pass manager: it keeps every compiled piece's final graph (after fix
  functionalization), so tests can prove no unfused chain is left.

Graph inspection names ops by their objects: ``op_counts(graph)[torch.ops.layerpass.x.default]``,
and ``functionalized(op)`` for an ``auto_functionalized(op, ...)`` node.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
from torch import fx, nn
from torch._higher_order_ops.auto_functionalize import auto_functionalized

import layerpass.ops  # noqa: F401  (registers the ops named below)
from layerpass.ops.library import schema_of
from layerpass.passes.base import LayerpassPass, PieceContext, compiling_piece
from tests.helpers import backend as bh
from tests.helpers.fp8 import fp8_bits, fp8_model_tolerance  # noqa: F401  (used as fh.fp8_bits, ...)

aten = torch.ops.aten
lp = torch.ops.layerpass


# ----------------------------------------------------------------------------- graph capture


@dataclass
class Captured:
    """A captured forward graph and the real values of its placeholders (in order)."""

    gm: fx.GraphModule
    args: list[Any]

    def run(self, gm: fx.GraphModule | None = None) -> Any:
        out = (gm or self.gm)(*self.args)
        return out[0] if isinstance(out, (list, tuple)) and len(out) == 1 else out


def capture_graph(module: nn.Module, inputs: Sequence[Any], *, metadata: Any = None, registry: Any = None) -> Captured:
    """Trace ``module(*inputs)`` through Dynamo and AOT autograd (Inductor decompositions,
    ``auto_functionalized`` v1) and return the forward graph with the real placeholder values."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    from layerpass.ops import set_forward_context

    graphs: list[fx.GraphModule] = []
    real: list[list[Any]] = []

    def fw_compiler(gm: fx.GraphModule, _example: Any) -> Callable[..., Any]:
        graphs.append(gm)

        def run(*args: Any) -> Any:
            real.append(list(args))
            return gm(*args)

        return run

    torch.compiler.reset()
    backend = aot_autograd(fw_compiler=fw_compiler, decompositions=select_decomp_table())
    with torch.no_grad(), set_forward_context(metadata, registry), \
            torch._inductor.config.patch(enable_auto_functionalized_v2=False):
        torch.compile(module, backend=backend, fullgraph=True, dynamic=False)(*inputs)
    torch.compiler.reset()
    if len(graphs) != 1 or len(real) != 1:
        raise AssertionError(f"expected one captured forward graph, got {len(graphs)} graphs and {len(real)} calls")
    return Captured(graphs[0], real[0])


def clone_gm(gm: fx.GraphModule) -> fx.GraphModule:
    """An independent copy (passes mutate graphs in place)."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph)


def apply_passes(gm: fx.GraphModule, passes: Iterable[Any], context: PieceContext | None = None) -> tuple[fx.GraphModule, dict[str, int]]:
    """Run layerpass passes on a copy of ``gm`` (each ``prepare``d with ``context``); returns the copy
    and matches per pass."""
    new = clone_gm(gm)
    matches: dict[str, int] = {}
    context = context if context is not None else PieceContext()
    with compiling_piece(context):
        for p in passes:
            p.prepare(context)
            matches[p.name] = int(p.apply(new.graph) or 0)
            new.graph.lint()
    new.recompile()
    return new, matches


# ----------------------------------------------------------------------------- graph inspection


class functionalized(NamedTuple):
    """The key of an ``auto_functionalized(op, ...)`` node in ``op_counts``."""

    op: torch._ops.OpOverload


def op_key(node: fx.Node) -> Any:
    """What a call node calls: its ``OpOverload`` (or other target); ``functionalized(op)`` for the HOP."""
    if node.target is auto_functionalized:
        return functionalized(node.args[0])
    return node.target


def op_counts(graph: fx.Graph) -> Counter:
    return Counter(op_key(n) for n in graph.nodes if n.op == "call_function")


def has_auto_functionalized(graph: fx.Graph) -> bool:
    return any(n.op == "call_function" and n.target is auto_functionalized for n in graph.nodes)


_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, operator.getitem)
_QUANTS = (lp.static_scaled_fp8_quant.default, functionalized(lp.static_scaled_fp8_quant.default),
           lp.static_scaled_fp8_quant_functional.default)


def _through_views(node: fx.Node) -> fx.Node:
    while node.op == "call_function" and node.target in _VIEWS:
        node = node.args[0]
    return node


def _writer(node: fx.Node) -> fx.Node:
    """For a buffer an in-place op writes (after fix functionalization), that op; else ``node``."""
    for user in node.users:
        target = user.target
        if isinstance(target, torch._ops.OpOverload) and any(
                a.alias_info is not None and a.alias_info.is_write and user.kwargs.get(a.name) is node
                for a in schema_of(target).arguments):
            return user
    return node


def quants_fed_by(graph: fx.Graph, producer: Any) -> list[fx.Node]:
    """Static FP8 quant nodes (out-variant or functional, wrapped or not) whose input comes, through
    views/getitems only, from a ``producer`` node (an ``op_key``), or from the buffer an in-place
    ``producer`` wrote."""
    found = []
    for n in graph.nodes:
        if n.op != "call_function" or op_key(n) not in _QUANTS:
            continue
        src = n.kwargs.get("input", n.args[1] if n.target is lp.static_scaled_fp8_quant.default and len(n.args) > 1
                           else n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None)
        if isinstance(src, fx.Node) and op_key(_writer(_through_views(src))) == producer:
            found.append(n)
    return found


# ----------------------------------------------------------------------------- full compiles


class RecordingPass(LayerpassPass):
    """Added last: keeps each compiled piece's final graph (a copy); changes nothing."""

    name = "record_final_graph"

    def __init__(self) -> None:
        super().__init__()
        self.graphs: list[fx.Graph] = []

    def apply(self, graph: fx.Graph) -> int:
        copy_ = fx.Graph()
        copy_.output(copy_.graph_copy(graph, {}))
        self.graphs.append(copy_)
        return 0

    def uuid(self) -> str:
        return "record-final-graph-v1"  # it never changes a graph: Inductor's cache may serve pieces


def compile_recorded(name: str, num_layers: int, *, step: dict[str, Any] | None = None, **config: Any) -> bh.Compiled:
    """``bh.compile_zoo`` (cache disabled) with a ``RecordingPass`` added: ``.graphs`` holds every
    piece whose passes ran in this process; pieces Inductor served from its cache are not re-recorded."""
    recorder = RecordingPass()
    c = bh.compile_zoo(name, num_layers, step=step, disable_cache=True,
                       setup=lambda compiled: compiled.backend.pass_manager.add_pass(recorder), **config)
    return replace(c, cache_dir=None, graphs=recorder.graphs)
