"""Lowering: each layerpass op the fusions left whose native torch code Inductor generates well is
replaced, in the post-grad graph, by that code, so Inductor fuses it with its neighbours.

Every norm / activation / quant op is an opaque ``torch.library`` custom op (``ops/``) so that the
fusion patterns match single nodes. After the fusions, one left opaque is a Python call per step
(argument checks included) that Inductor can neither see into nor fuse with. This pass, which runs
after the fusions and before dead-code clean-up / fix functionalization, walks the op table
(``layerpass.ops.library.OPS``): for a node of an op that lowers, it asks the op's own argument
check (``OpDef.check``, on the node's fake inputs, sizes compared only where provable), traces the
op's own native code (``OpDef.native``) with ``make_fx`` and Inductor's decompositions
(``pattern_matcher.fwd_only``, as Inductor's own replacements are traced) on the node's fake
inputs (``meta["val"]``, symbolic sizes included) and inlines it in place of the node. This file
holds no op's code, check or name: an op that lowers says so where it is defined.

- a plain op node: its users (or its ``getitem`` users, for ops returning several tensors) now use
  the inlined values;
- a mutating op appears functionalized, ``auto_functionalized(op, **kw)`` (v1) with ``getitem``
  users: the node and its getitems are replaced by the functional native computation (the
  ``getitem`` of a mutated buffer becomes the value the op would have written into it).

Which ops are lowered is ``CompilationConfig.custom_ops`` (vLLM's spelling, resolved once by
``layerpass.ops.custom_ops.resolve_custom_ops``): ``"none"`` (the default) keeps no custom kernel
for a lowerable op, ``"all"`` keeps every one, ``"+name"`` keeps ``name`` and ``"-name"`` lowers
it. Attention, linear attention, MoE and the tensor-parallel collectives never lower (their
kernels are better, or they hold per-layer state): ``layerpass.ops.library.always_custom_ops()``.

A node is left as the op (and counted nowhere, logged at debug level with the reason) when its
result is unused (dead-code clean-up removes it), when its inputs do not provably satisfy the op's
argument checks (sizes compared with ``statically_known_true``, never by guarding: the op then
raises its own clear error at run time), when tracing the native code would have to assume
anything about a symbolic size (a guard, a replacement or a runtime assertion added to the shape
env after Dynamo is done protects nothing, or perturbs the graph's other fake values), or when the
native code would give an output of another shape, dtype or layout than the op's. In practice: a
residual op whose input and residual token counts are two unbacked sizes Dynamo never related
(each graph input's token dim is marked unbacked on its own) stays an op.

What the lowered code does not do that the op did: read a CPU FP8 scale's value on every call to
refuse a zero / negative / non-finite one. Scales are checked where they enter (layer construction,
``load_state_dict``); a scale mutated in place afterwards is not re-checked in compiled code.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch._higher_order_ops.auto_functionalize import auto_functionalized

from layerpass.ops.library import OPS, OpDef, lowerable_ops, op_overload, provable_sizes, schema_of

from .base import LayerpassPass, module_closure

logger = logging.getLogger("layerpass")

Tensor = torch.Tensor


def _known(cond: Any) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(cond))


def _same_shape(a: Tensor, b: Tensor) -> bool:
    return a.dim() == b.dim() and all(_known(x == y) for x, y in zip(a.shape, b.shape))


# ----------------------------------------------------------------------------- the pass


def _bind(op: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The op's arguments by schema name (defaults filled in); None if they do not fit the schema."""
    bound: dict[str, Any] = {}
    schema_args = schema_of(op).arguments
    if len(args) > len(schema_args):
        return None
    for i, a in enumerate(schema_args):
        if i < len(args):
            bound[a.name] = args[i]
        elif a.name in kwargs:
            bound[a.name] = kwargs[a.name]
        elif a.has_default_value():
            bound[a.name] = a.default_value
        else:
            return None
    if set(kwargs) - set(bound):
        return None
    return bound


def _val(x: Any) -> Any:
    return x.meta.get("val") if isinstance(x, fx.Node) else x


def _same_layout(old: Any, new: Any) -> bool:
    """Whether ``new`` (the native code's output) has ``old``'s (the op's) shape, dtype and strides."""
    if not isinstance(old, Tensor) or not isinstance(new, Tensor):
        return False
    return (old.dtype == new.dtype and old.device == new.device and _same_shape(old, new)
            and all(_known(a == b) for a, b in zip(old.stride(), new.stride())))


@dataclass
class _Plan:
    """What replacing one node takes: its native code traced, the node's inputs by placeholder, and
    the values its users read (the node itself, or each read getitem by output index)."""

    replacement: fx.GraphModule
    inputs: list[fx.Node]
    outputs: dict[fx.Node, int | None]


class LoweringPass(LayerpassPass):
    """Replaces each left-over node of the ``ops`` (default: every op of ``OPS`` that lowers) by
    its native code (``OpDef.native``);
    ``apply`` returns the number of nodes lowered (``CompileReport.matches["lowering"]``). A node
    that stays an op is logged at debug level with the reason."""

    name = "lowering"

    def __init__(self, ops: Iterable[str] | None = None) -> None:
        super().__init__()
        names = lowerable_ops() if ops is None else tuple(ops)
        not_lowerable = [n for n in names if n not in OPS or not OPS[n].lowers]
        if not_lowerable:
            raise ValueError(f"LoweringPass: not lowerable: {not_lowerable}; lowerable ops: {', '.join(lowerable_ops())}")
        self.ops = tuple(sorted(set(names)))
        self._targets = {op_overload(n): OPS[n] for n in self.ops}

    def config_key(self) -> str:
        return "lower=" + ",".join(self.ops)

    def _source_modules(self) -> dict[str, str]:
        """The pass's own modules and those defining the native code and checks it inlines (the op
        modules: this one names none of them), so editing an op's native code changes the uuid."""
        roots = {f.__module__ for n in self.ops for f in (OPS[n].native, OPS[n].check) if f is not None}
        return {**super()._source_modules(),
                **module_closure(sorted(roots), {r.partition(".")[0] for r in roots})}

    def apply(self, graph: fx.Graph) -> int:
        lowered = 0
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            functional = node.target is auto_functionalized
            op = node.args[0] if functional else node.target
            spec = self._targets.get(op) if isinstance(op, torch._ops.OpOverload) else None
            if spec is None or (not functional and schema_of(op).is_mutable):
                continue  # not lowered here, or an in-place call outside functionalization
            try:  # everything that can fail happens before the graph is touched
                plan = self._plan(node, op, spec, functional)
            except Exception as e:
                plan = f"{type(e).__name__}: {e}"
            if isinstance(plan, str):
                logger.debug("layerpass: lowering: %s stays an op (%s)", node.format_node(), plan)
                continue
            self._inline(graph, node, plan)
            lowered += 1
        return lowered

    def _plan(self, node: fx.Node, op: torch._ops.OpOverload, spec: OpDef, functional: bool) -> _Plan | str:
        """How to replace ``node``, or why it stays an op."""
        bound = _bind(op, () if functional else tuple(node.args), dict(node.kwargs))
        if bound is None:
            return "its arguments do not fit the schema"
        if functional or len(schema_of(op).returns) != 1:  # users read getitems of a tuple
            if not all(u.target is operator.getitem and isinstance(u.args[1], int) for u in node.users):
                return "a user of its tuple result is not a getitem"
            outputs: dict[fx.Node, int | None] = {u: u.args[1] for u in node.users if u.users}
        else:
            outputs = {node: None} if node.users else {}
        if not outputs:
            return "unused (dead-code clean-up removes it)"
        if any(isinstance(v, (list, tuple)) and any(isinstance(x, fx.Node) for x in v) for v in bound.values()):
            return "a list of tensors argument"
        tensor_names = [k for k, v in bound.items() if isinstance(v, fx.Node)]
        fake = {k: _val(v) for k, v in bound.items()}
        if any(not isinstance(fake[k], Tensor) for k in tensor_names):
            return "an input without a fake tensor value (meta['val'])"
        if spec.check is not None:
            try:
                with provable_sizes():  # an unprovable size relation refuses, never a guard
                    spec.check(**fake)
            except Exception as e:
                return f"its inputs do not provably meet the op's check ({type(e).__name__}: {e})"
        consts = {k: v for k, v in bound.items() if k not in tensor_names}

        def native(*tensors: Tensor) -> Any:
            return spec.native(**consts, **dict(zip(tensor_names, tensors)))

        replacement = _trace(native, [fake[k] for k in tensor_names])
        if isinstance(replacement, str):
            return replacement
        placeholders = [n for n in replacement.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(tensor_names):
            return "the traced native code takes other inputs"
        if any(n.op in ("get_attr", "call_module", "call_method") for n in replacement.graph.nodes):
            return "the traced native code holds constants or modules"
        new_outs = replacement.graph.output_node().args[0]
        for old, idx in outputs.items():
            if idx is None:
                new = new_outs
            else:
                new = new_outs[idx] if isinstance(new_outs, (tuple, list)) and idx < len(new_outs) else None
            if not isinstance(new, fx.Node) or not _same_layout(_val(old), _val(new)):
                return f"the native output {idx if idx is not None else ''} differs in shape, dtype or strides"
        return _Plan(replacement, [bound[k] for k in tensor_names], outputs)

    @staticmethod
    def _inline(graph: fx.Graph, node: fx.Node, plan: _Plan) -> None:
        placeholders = [n for n in plan.replacement.graph.nodes if n.op == "placeholder"]
        val_map: dict[fx.Node, fx.Node] = dict(zip(placeholders, plan.inputs))
        with graph.inserting_before(node):
            copied = graph.graph_copy(plan.replacement.graph, val_map)
        for new in list(val_map.values())[len(placeholders):]:  # provenance, for graph dumps and profiles
            for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
                if key in node.meta:
                    new.meta.setdefault(key, node.meta[key])
        for old, idx in plan.outputs.items():
            old.replace_all_uses_with(copied if idx is None else copied[idx])
        for user in list(node.users):  # getitems, now unread
            graph.erase_node(user)
        graph.erase_node(node)


def _shape_env_state(mode: Any) -> tuple[int, ...]:
    env = getattr(mode, "shape_env", None)
    if env is None:
        return ()
    return (len(env.guards), len(env.replacements), sum(len(v) for v in env.deferred_runtime_asserts.values()))


def _trace(fn: Callable[..., Any], fake_args: list[Tensor]) -> fx.GraphModule | str:
    """``fn`` traced to post-grad aten (Inductor's decompositions, as its own replacements are) on
    ``fake_args``, in their fake mode; a reason string if the trace had to assume anything about a
    symbolic size (a guard, a replacement, a runtime assertion): the compiled code would rely on it."""
    from torch._guards import detect_fake_mode
    from torch._inductor.pattern_matcher import fwd_only

    mode = detect_fake_mode(fake_args)
    if mode is None:
        return "its inputs carry no fake mode"
    before = _shape_env_state(mode)
    with mode:
        gm = fwd_only(fn, fake_args)
    if _shape_env_state(mode) != before:
        return "tracing the native code had to assume something about a symbolic size"
    return gm
