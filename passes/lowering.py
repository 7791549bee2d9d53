"""Lowering: each layerpass op the fusions left whose native torch code Inductor generates well is
replaced, in the post-grad graph, by that code, so Inductor fuses it with its neighbours.

Every norm / activation / quant op is an opaque ``torch.library`` custom op (``ops/``) so that the
fusion patterns match single nodes. After the fusions, one left opaque is a Python call per step
(argument checks included) that Inductor can neither see into nor fuse with. This pass, which runs
after the fusions and before dead-code clean-up / fix functionalization, traces the op's native
implementation (the pure-torch references of ``ops/``) with ``make_fx`` and Inductor's
decompositions (``pattern_matcher.fwd_only``, as Inductor's own replacements are traced) on the
node's fake inputs (``meta["val"]``, symbolic sizes included) and inlines it in place of the node:

- a plain op node: its users (or its ``getitem`` users, for ops returning several tensors) now use
  the inlined values;
- a mutating op appears functionalized, ``auto_functionalized(op, **kw)`` (v1) with ``getitem``
  users: the node and its getitems are replaced by the functional native computation (the
  ``getitem`` of a mutated buffer becomes the value the op would have written into it).

Which ops are lowered is ``CompilationConfig.custom_ops`` (vLLM's spelling, resolved by
``resolve_custom_ops``): ``"none"`` (the default) keeps no custom kernel for a lowerable op,
``"all"`` keeps every one, ``"+name"`` keeps ``name`` and ``"-name"`` lowers it. Attention, linear
attention, MoE and the tensor-parallel collectives are never lowered (their kernels are better, or
they hold per-layer state): ``ALWAYS_CUSTOM``.

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

from layerpass.ops.library import op_overload, schema_of
from layerpass.ops.norm import rms_norm_ref, silu_and_mul_ref
from layerpass.ops.quant import FP8_DTYPE, quantize_fp8

from .base import LayerpassPass

logger = logging.getLogger("layerpass")

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- native code


def _rms_norm(x: Tensor, weight: Tensor, epsilon: float) -> Tensor:
    return rms_norm_ref(x, weight, epsilon)


def _add(x: Tensor, residual: Tensor) -> Tensor:
    return (x.float() + residual.float()).to(x.dtype)


def _fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    summed = _add(x, residual)
    return rms_norm_ref(summed, weight, epsilon), summed


def _silu_and_mul(x: Tensor) -> Tensor:
    return silu_and_mul_ref(x)


def _static_scaled_fp8_quant(result: Tensor, input: Tensor, scale: Tensor) -> tuple[None, Tensor]:
    return None, quantize_fp8(input, scale)


def _static_scaled_fp8_quant_functional(input: Tensor, scale: Tensor) -> Tensor:
    return quantize_fp8(input, scale)


def _scaled_fp8_mm(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, out_dtype: torch.dtype,
                   bias: Tensor | None = None) -> Tensor:
    out = torch.matmul(a.float(), b.float().t()) * (scale_a.float() * scale_b.float())
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def _rms_norm_static_fp8_quant(input: Tensor, weight: Tensor, scale: Tensor, epsilon: float) -> Tensor:
    return quantize_fp8(rms_norm_ref(input, weight, epsilon), scale)


def _fused_add_rms_norm_static_fp8_quant(input: Tensor, residual: Tensor, weight: Tensor, scale: Tensor,
                                         epsilon: float) -> tuple[Tensor, Tensor]:
    summed = _add(input, residual)
    return quantize_fp8(rms_norm_ref(summed, weight, epsilon), scale), summed


def _silu_and_mul_static_fp8_quant(input: Tensor, scale: Tensor) -> Tensor:
    return quantize_fp8(silu_and_mul_ref(input), scale)


# ----------------------------------------------------------------------------- preconditions
# The op's argument checks on fake inputs, answered without adding a guard: a size relation that is
# not provable (statically_known_true) counts as failed, and the node keeps the op.


def _known(cond: Any) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(cond))


def _same_shape(a: Tensor, b: Tensor) -> bool:
    return a.dim() == b.dim() and all(_known(x == y) for x, y in zip(a.shape, b.shape))


def _float_input(x: Any) -> bool:
    return isinstance(x, Tensor) and x.is_floating_point() and x.dtype != FP8_DTYPE


def _norm_ok(x: Tensor, weight: Tensor, residual: Tensor | None = None) -> bool:
    return (_float_input(x) and x.dim() >= 1 and isinstance(weight, Tensor) and weight.dim() == 1
            and _known(weight.shape[0] == x.shape[-1])
            and (residual is None or (isinstance(residual, Tensor) and residual.dtype == x.dtype
                                      and _same_shape(x, residual))))


def _even_last_dim(x: Tensor) -> bool:
    return _float_input(x) and x.dim() >= 1 and _known(x.shape[-1] % 2 == 0)


def _one_element(scale: Any) -> bool:
    return isinstance(scale, Tensor) and _known(scale.numel() == 1)


def _check_rms_norm(x, weight, epsilon) -> bool:
    return _norm_ok(x, weight)


def _check_fused_add_rms_norm(x, residual, weight, epsilon) -> bool:
    return _norm_ok(x, weight, residual)


def _check_silu_and_mul(x) -> bool:
    return _even_last_dim(x)


def _check_quant(result, input, scale) -> bool:
    return (_one_element(scale) and _float_input(input) and isinstance(result, Tensor)
            and result.dtype == FP8_DTYPE and _same_shape(result, input))


def _check_quant_functional(input, scale) -> bool:
    return _one_element(scale) and _float_input(input)


def _check_scaled_fp8_mm(a, b, scale_a, scale_b, out_dtype, bias=None) -> bool:
    return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == FP8_DTYPE and b.dtype == FP8_DTYPE
            and a.dim() >= 1 and b.dim() == 2 and _known(a.shape[-1] == b.shape[1])
            and isinstance(scale_a, Tensor) and isinstance(scale_b, Tensor))


def _check_rms_norm_quant(input, weight, scale, epsilon) -> bool:
    return _norm_ok(input, weight) and _one_element(scale)


def _check_fused_add_rms_norm_quant(input, residual, weight, scale, epsilon) -> bool:
    return _norm_ok(input, weight, residual) and _one_element(scale)


def _check_silu_and_mul_quant(input, scale) -> bool:
    return _even_last_dim(input) and _one_element(scale)


@dataclass(frozen=True)
class Lowering:
    """An op's native code and the preconditions under which it equals the op."""

    native: Callable[..., Any]
    check: Callable[..., bool]


# The ops a lowering exists for, in a stable order (what "custom_ops" may name).
LOWERINGS: dict[str, Lowering] = {
    "rms_norm": Lowering(_rms_norm, _check_rms_norm),
    "fused_add_rms_norm": Lowering(_fused_add_rms_norm, _check_fused_add_rms_norm),
    "silu_and_mul": Lowering(_silu_and_mul, _check_silu_and_mul),
    "static_scaled_fp8_quant": Lowering(_static_scaled_fp8_quant, _check_quant),
    "static_scaled_fp8_quant_functional": Lowering(_static_scaled_fp8_quant_functional, _check_quant_functional),
    "scaled_fp8_mm": Lowering(_scaled_fp8_mm, _check_scaled_fp8_mm),
    "rms_norm_static_fp8_quant": Lowering(_rms_norm_static_fp8_quant, _check_rms_norm_quant),
    "fused_add_rms_norm_static_fp8_quant": Lowering(_fused_add_rms_norm_static_fp8_quant,
                                                    _check_fused_add_rms_norm_quant),
    "silu_and_mul_static_fp8_quant": Lowering(_silu_and_mul_static_fp8_quant, _check_silu_and_mul_quant),
}
LOWERABLE_OPS: tuple[str, ...] = tuple(LOWERINGS)
# layerpass ops that always keep their kernel: attention and linear attention (their kernels beat
# anything Inductor generates from the reference), MoE (routing + expert loops), TP collectives.
ALWAYS_CUSTOM: tuple[str, ...] = ("unified_attention_with_output", "linear_attention", "moe_forward",
                                  "moe_forward_shared", "moe_forward_fp8", "moe_forward_quant_input",
                                  "tp_all_reduce", "tp_all_gather")


def resolve_custom_ops(custom_ops: Iterable[str], what: str = "CompilationConfig.custom_ops") -> tuple[str, ...]:
    """The ops to lower (in ``LOWERABLE_OPS`` order) for a vLLM-style ``custom_ops`` list.

    ``"none"``: no lowerable op keeps its custom kernel (everything lowerable is lowered; also what
    an empty list means); ``"all"``: every op keeps it (nothing lowered); then ``"+name"`` keeps
    ``name``'s custom kernel and ``"-name"`` lowers it. ``ValueError`` for anything else, naming
    the entry and the allowed names."""
    entries = list(custom_ops)
    allowed = ", ".join(LOWERABLE_OPS)
    for e in entries:
        if not isinstance(e, str):
            raise TypeError(f"{what} entries must be str ('none', 'all', '+name' or '-name'), got "
                            f"{type(e).__name__} {e!r}")
    if "all" in entries and "none" in entries:
        raise ValueError(f"{what} names both 'all' and 'none'; give at most one of them")
    lowered = [] if "all" in entries else list(LOWERABLE_OPS)
    seen: dict[str, str] = {}
    for e in entries:
        if e in ("all", "none"):
            continue
        sign, name = e[:1], e[1:]
        if sign not in ("+", "-") or not name:
            raise ValueError(f"{what} entry {e!r} must be 'none', 'all', '+name' (keep the op's custom kernel) "
                             f"or '-name' (lower it to code Inductor generates); names: {allowed}")
        if name in ALWAYS_CUSTOM:
            raise ValueError(f"{what} entry {e!r}: layerpass.{name} always keeps its custom kernel (it is not "
                             f"lowerable); lowerable ops: {allowed}")
        if name not in LOWERINGS:
            raise ValueError(f"{what} entry {e!r}: {name!r} is not a lowerable layerpass op; lowerable ops: {allowed}")
        if seen.get(name, sign) != sign:
            raise ValueError(f"{what} names {name!r} both with '+' and '-'")
        seen[name] = sign
        if sign == "+" and name in lowered:
            lowered.remove(name)
        elif sign == "-" and name not in lowered:
            lowered.append(name)
    return tuple(n for n in LOWERABLE_OPS if n in lowered)


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
    """Replaces each left-over node of the ``ops`` (names in ``LOWERABLE_OPS``) by its native code;
    ``apply`` returns the number of nodes lowered (``CompileReport.matches["lowering"]``). A node
    that stays an op is logged at debug level with the reason."""

    name = "lowering"

    def __init__(self, ops: Iterable[str] = LOWERABLE_OPS) -> None:
        super().__init__()
        names = tuple(ops)
        unknown = [n for n in names if n not in LOWERINGS]
        if unknown:
            raise ValueError(f"LoweringPass: not lowerable: {unknown}; lowerable ops: {', '.join(LOWERABLE_OPS)}")
        self.ops = tuple(n for n in LOWERABLE_OPS if n in names)
        self._targets = {op_overload(n): LOWERINGS[n] for n in self.ops}

    def config_key(self) -> str:
        return "lower=" + ",".join(self.ops)

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

    def _plan(self, node: fx.Node, op: torch._ops.OpOverload, spec: Lowering, functional: bool) -> _Plan | str:
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
        if not spec.check(**fake):
            return "its inputs do not provably meet the op's checks"
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
