"""Helpers for the fusion / clean-up pass tests (``tests/test_fusion_*.py`` and friends).

Two ways to get the graphs the passes see:

- ``capture_graph``: Dynamo + AOT autograd with Inductor's decompositions and v1
  ``auto_functionalized`` (what the layerpass backend configures), stopping BEFORE Inductor's
  code generation. The captured forward graph has the post-grad shape the patterns are written
  for (layer names are placeholders), costs well under a second, and can be run eagerly before
  and after a pass, so hypothesis can vary shapes cheaply.
- ``compile_recorded``: a full ``layerpass.compile`` of a zoo model with a ``RecordingPass``
  appended to the pass manager: it keeps every compiled piece's final graph (after fix
  functionalization), so tests can prove no unfused chain is left.

Importing ``backend_helpers`` first points Inductor at the test session's own cache dir.
"""

from __future__ import annotations

import copy
import operator
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from tests.helpers import backend as bh  # noqa: F401  (sets TORCHINDUCTOR_CACHE_DIR for the session)

from torch._higher_order_ops.auto_functionalize import auto_functionalized

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


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

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=fw_compiler, decompositions=select_decomp_table())
    with torch.no_grad(), set_forward_context(metadata, registry), \
            torch._inductor.config.patch(enable_auto_functionalized_v2=False):
        torch.compile(module, backend=backend, fullgraph=True, dynamic=False)(*inputs)
    torch._dynamo.reset()
    if len(graphs) != 1 or len(real) != 1:
        raise AssertionError(f"expected one captured forward graph, got {len(graphs)} graphs and {len(real)} calls")
    return Captured(graphs[0], real[0])


def clone_gm(gm: fx.GraphModule) -> fx.GraphModule:
    """An independent copy (passes mutate graphs in place)."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph)


def apply_passes(gm: fx.GraphModule, passes: Iterable[Any], context: dict[str, Any] | None = None) -> tuple[fx.GraphModule, dict[str, int]]:
    """Run layerpass passes on a copy of ``gm`` (each ``prepare``d with ``context``); returns the copy
    and matches per pass."""
    new = clone_gm(gm)
    matches: dict[str, int] = {}
    for p in passes:
        p.prepare(context or {})
        matches[p.name] = int(p.apply(new.graph) or 0)
        new.graph.lint()
    new.recompile()
    return new, matches


# ----------------------------------------------------------------------------- graph inspection


def target_name(node: fx.Node) -> str:
    """``layerpass.op`` / ``aten.op`` of a call; ``auto_functionalized(layerpass.op)`` for the HOP."""
    t = node.target
    if t is auto_functionalized:
        inner = node.args[0]
        return f"auto_functionalized({inner.namespace}.{inner._schema.name.split('::')[-1]})"
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._schema.name.split('::')[-1]}"
    if t is operator.getitem:
        return "getitem"
    return str(getattr(t, "__name__", t))


def op_counts(graph: fx.Graph) -> Counter:
    return Counter(target_name(n) for n in graph.nodes if n.op == "call_function")


def has_auto_functionalized(graph: fx.Graph) -> bool:
    return any(n.op == "call_function" and "auto_functionalized" in str(n.target) for n in graph.nodes)


def _through_views(node: fx.Node) -> fx.Node:
    while node.op == "call_function" and target_name(node) in ("aten.view", "aten.reshape", "aten._unsafe_view", "getitem"):
        node = node.args[0]
    return node


def _writer(node: fx.Node) -> fx.Node:
    """For a buffer an in-place op writes (after fix functionalization), that op; else ``node``."""
    for user in node.users:
        target = user.target
        if isinstance(target, torch._ops.OpOverload) and any(
                a.alias_info is not None and a.alias_info.is_write and user.kwargs.get(a.name) is node
                for a in target._schema.arguments):
            return user
    return node


def quants_fed_by(graph: fx.Graph, producer: str) -> list[fx.Node]:
    """Static FP8 quant nodes (out-variant or functional, wrapped or not) whose input comes, through
    views/getitems only, from a ``producer`` node (a ``target_name``), or from the buffer an in-place
    ``producer`` wrote."""
    quant_names = {"layerpass.static_scaled_fp8_quant", "auto_functionalized(layerpass.static_scaled_fp8_quant)",
                   "layerpass.static_scaled_fp8_quant_functional"}
    found = []
    for n in graph.nodes:
        if n.op != "call_function" or target_name(n) not in quant_names:
            continue
        src = n.kwargs.get("input", n.args[1] if target_name(n) == "layerpass.static_scaled_fp8_quant" and len(n.args) > 1
                           else n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None)
        if isinstance(src, fx.Node) and target_name(_writer(_through_views(src))) == producer:
            found.append(n)
    return found


# ----------------------------------------------------------------------------- full compiles


class RecordingPass:
    """Appended after fix functionalization: keeps each compiled piece's final graph (a copy)."""

    name = "record_final_graph"

    def __init__(self) -> None:
        self.registrations = 0
        self.graphs: list[fx.Graph] = []

    def prepare(self, context: dict[str, Any]) -> None:
        pass

    def apply(self, graph: fx.Graph) -> int:
        copy_ = fx.Graph()
        copy_.output(copy_.graph_copy(graph, {}))
        self.graphs.append(copy_)
        return 0

    def uuid(self) -> str:
        return "record-final-graph-v1"


@dataclass
class CompiledRun:
    model: Any
    compiled: Any
    step: Any
    ref: torch.Tensor
    out: torch.Tensor
    report: Any
    graphs: list[fx.Graph] = field(default_factory=list)


def compile_recorded(name: str, num_layers: int, *, step: dict[str, Any] | None = None, **config: Any) -> CompiledRun:
    """``backend_helpers.compile_zoo`` (cache disabled) with a ``RecordingPass`` installed: the
    recorder sees every piece whose passes ran in this process; pieces Inductor served from its
    cache are not re-recorded."""
    recorder = RecordingPass()
    c = bh.compile_zoo(name, num_layers, step=step, disable_cache=True,
                       setup=lambda compiled: compiled.backend.pass_manager.passes.append(recorder), **config)
    return CompiledRun(c.model, c.compiled, c.step, c.ref, c.out, c.report, recorder.graphs)


# ----------------------------------------------------------------------------- numerics


def fp8_bits(x: torch.Tensor) -> torch.Tensor:
    assert x.dtype == FP8, x.dtype
    return x.view(torch.uint8)


def assert_fp8_close(a: torch.Tensor, b: torch.Tensor, scale: float, what: str, max_steps: int = 1) -> None:
    """Two fp8 results agree within ``max_steps`` e4m3 rounding steps (3 mantissa bits: a relative
    step of 1/8) plus the smallest subnormal, after dequantisation."""
    da, db = a.float() * scale, b.float() * scale
    bound = (db.abs() / 8 + 2.0 ** -9) * max_steps * scale + 1e-12
    bad = (da - db).abs() > bound
    assert not bad.any(), f"{what}: {int(bad.sum())} fp8 values differ by more than {max_steps} step(s); max diff {(da - db).abs().max()}"


def fp8_model_tolerance(ref: torch.Tensor) -> dict[str, float]:
    """Tolerance of an FP8 model's logits vs another FP8 model's: e4m3 has ~6% relative rounding, so
    one flipped rounding in a layer moves logits by a few percent of their spread."""
    spread = float(ref.abs().max())
    return {"atol": 0.1 * spread + 1e-3, "rtol": 0.1}


def deepcopy_module(m: nn.Module) -> nn.Module:
    return copy.deepcopy(m)
