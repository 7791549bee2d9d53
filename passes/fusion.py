"""Fusion passes on Inductor's own pattern matcher (``register_replacement`` + ``PatternMatcherPass``).

Patterns live in ``layerpass.patterns``; this module only registers them. Patterns that
name a layer are version-conditional: with ``USE_LAYERNAME`` one registration (name as a
pattern input) serves every layer; without it one pattern is registered per layer name
found in the pieces being compiled (``prepare`` receives the piece's ``str`` constants).
Registration happens under a ``FakeTensorMode`` so tracing never runs a real kernel.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from torch._prims_common import is_contiguous_or_false
from torch._inductor.pattern_matcher import Match, PatternMatcherPass, fwd_only, register_replacement
from torch._subclasses.fake_tensor import FakeTensorMode

from layerpass.envs import USE_LAYERNAME
from layerpass.ops import LayerName, lookup_layer, resolve_layer_name
from layerpass.patterns import act_quant, attn_quant, moe, moe_quant, norm_quant

from .base import LayerpassPass

logger = logging.getLogger("layerpass")


def names_op(target: str, named_op: str) -> bool:
    """Whether a piece constant's op target (``"namespace.op.overload"``, as ``piece_hash``
    writes it) is ``named_op`` (``"namespace.op"``); ``moe_forward`` is not ``moe_forward_shared``."""
    return target == named_op or target.startswith(named_op + ".")


class PatternFusionPass(LayerpassPass):
    """Base of the fusion passes: owns one ``PatternMatcherPass`` and counts registrations."""

    #: op ("namespace.op") whose str layer-name constants get per-layer patterns without LayerName
    named_op: str | None = None

    def __init__(self) -> None:
        super().__init__()
        self.patterns = PatternMatcherPass(pass_name=f"layerpass_{self.name}")
        self._static_done = False
        self._names: set[str] = set()
        self.context: dict[str, Any] = {}

    def register(self, pattern: Callable, replacement: Callable, example_inputs: Callable[[], list],
                 **kwargs: Any) -> None:
        with FakeTensorMode():
            register_replacement(pattern, replacement, example_inputs(), fwd_only, self.patterns, **kwargs)
        self.registrations += 1

    def register_static(self) -> None:
        """Patterns that do not depend on layer names (and, with LayerName, the named ones)."""

    def register_for_name(self, name: str) -> None:
        """One pattern for the layer called ``name`` (only without LayerName)."""

    def prepare(self, context: dict[str, Any]) -> None:
        self.context = context
        if not self._static_done:
            self.register_static()
            self._static_done = True
        if not USE_LAYERNAME and self.named_op is not None:
            for _, target, value in context.get("str_constants", []):
                if names_op(target, self.named_op) and value not in self._names:
                    self._names.add(value)
                    self.register_for_name(value)

    def apply(self, graph: fx.Graph) -> int:
        return int(self.patterns.apply(graph) or 0)


def reshapes_to_views(graph: fx.Graph) -> int:
    """``reshape`` of a contiguous tensor is a ``view``; patterns are traced with views
    (tracing decomposes reshape), while Dynamo graphs may keep ``reshape``."""
    changed = 0
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.reshape.default:
            val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
            if isinstance(val, torch.Tensor) and is_contiguous_or_false(val):  # no guard on unbacked sizes
                node.target = torch.ops.aten.view.default
                changed += 1
    return changed


class AttnQuantFusionPass(PatternFusionPass):
    name = "fuse_attn_quant"
    named_op = "layerpass.unified_attention_with_output"

    def apply(self, graph: fx.Graph) -> int:
        reshapes_to_views(graph)
        return super().apply(graph)

    def register_static(self) -> None:
        if USE_LAYERNAME:
            pattern, replacement = attn_quant.attn_quant_pattern(None)
            self.register(pattern, replacement, lambda: attn_quant.attn_quant_example_inputs(LayerName("example")))

    def register_for_name(self, name: str) -> None:
        pattern, replacement = attn_quant.attn_quant_pattern(name)
        self.register(pattern, replacement, lambda: attn_quant.attn_quant_example_inputs(None))


class NormQuantFusionPass(PatternFusionPass):
    name = "fuse_norm_quant"

    def register_static(self) -> None:
        self.register(norm_quant.rms_norm_quant_pattern, norm_quant.rms_norm_quant_replacement,
                      lambda: norm_quant.norm_example_inputs(False), scalar_workaround={"eps": 1e-6})
        self.register(norm_quant.add_rms_norm_quant_pattern, norm_quant.add_rms_norm_quant_replacement,
                      lambda: norm_quant.norm_example_inputs(True), scalar_workaround={"eps": 1e-6})


class ActQuantFusionPass(PatternFusionPass):
    name = "fuse_act_quant"

    def register_static(self) -> None:
        self.register(act_quant.silu_mul_quant_pattern, act_quant.silu_mul_quant_replacement, act_quant.act_example_inputs)


class MoEFusionPass(PatternFusionPass):
    """Routed experts + shared-expert MLP -> ``moe_forward_shared``.

    The fused op runs the layer's own ``shared_experts``; the match is accepted only when the
    matched weights are that module's parameters (checked on the real tensors the backend
    passes in ``context["real_inputs"]``, and the layer resolved by name). Pieces that share
    the compiled artifact have the same structure, so the check carries over to them."""

    name = "fuse_moe"
    named_op = "layerpass.moe_forward"

    def register_static(self) -> None:
        if USE_LAYERNAME:
            for gated in (True, False):
                pattern, replacement = moe.moe_shared_pattern(None, gated)
                self.register(pattern, replacement, lambda g=gated: moe.moe_example_inputs(g, LayerName("example")),
                              extra_check=self._weights_are_shared_experts)

    def register_for_name(self, name: str) -> None:
        for gated in (True, False):
            pattern, replacement = moe.moe_shared_pattern(name, gated)
            self.register(pattern, replacement, lambda g=gated: moe.moe_example_inputs(g, None),
                          extra_check=lambda m, n=name: self._weights_are_shared_experts(m, n))

    def _real(self, node: Any) -> Any:
        if not isinstance(node, fx.Node) or node.op != "placeholder":
            return None
        placeholders = [n for n in node.graph.nodes if n.op == "placeholder"]
        real = self.context.get("real_inputs") or []
        idx = placeholders.index(node)
        return real[idx] if idx < len(real) else None

    def _weights_are_shared_experts(self, match: Match, name: str | None = None) -> bool:
        try:
            if name is None:
                value = self._real(match.kwargs.get("layer_name"))
                if value is None:
                    return False
                name = resolve_layer_name(value)
            layer = lookup_layer(name)
            shared = getattr(layer, "shared_experts", None)
            if shared is None:
                return False
            owned = {id(p) for p in shared.parameters()}
            weights = [self._real(match.kwargs[k]) for k in ("wg", "w13", "w2") if k in match.kwargs]
            return all(w is not None and id(w) in owned for w in weights)
        except Exception as e:  # unresolvable: do not fuse
            logger.info("layerpass: %s: not fusing MoE shared experts (%s: %s)", self.name, type(e).__name__, e)
            return False


class MoEQuantInputFusionPass(PatternFusionPass):
    """Static FP8 quant -> ``moe_forward_fp8`` becomes ``moe_forward_quant_input``: the op
    quantises while it reads, so the fp8 copy of the activations never goes through memory."""

    name = "fuse_moe_quant_input"
    named_op = "layerpass.moe_forward_fp8"

    def register_static(self) -> None:
        if USE_LAYERNAME:
            pattern, replacement = moe_quant.moe_quant_input_pattern(None)
            self.register(pattern, replacement, lambda: moe_quant.moe_quant_example_inputs(LayerName("example")))

    def register_for_name(self, name: str) -> None:
        pattern, replacement = moe_quant.moe_quant_input_pattern(name)
        self.register(pattern, replacement, lambda: moe_quant.moe_quant_example_inputs(None))
