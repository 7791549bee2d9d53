"""Fix functionalization (always last): ``auto_functionalized(op, **kw)`` -> ``op(**kw)`` in place.

Functionalization wraps every mutating custom op; left alone, Inductor may copy the
mutated buffers. When every buffer the op mutates is a fresh allocation used by nothing
else, calling the op in place is exactly equivalent, so the node is rewritten:
``getitem(at, 0)`` becomes the op's return value and ``getitem(at, i)`` the i-th mutated
buffer itself.
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch._higher_order_ops.auto_functionalize import auto_functionalized

from layerpass.ops.library import schema_of

from .base import LayerpassPass

aten = torch.ops.aten
_ALLOCATIONS = {aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default, aten.new_empty.default}


def mutated_arg_names(op: torch._ops.OpOverload) -> list[str]:
    return [a.name for a in schema_of(op).arguments if a.alias_info is not None and a.alias_info.is_write]


class FixFunctionalizationPass(LayerpassPass):
    name = "fix_functionalization"

    def apply(self, graph: fx.Graph) -> int:
        fixed = 0
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target is not auto_functionalized:
                continue
            op = node.args[0]
            names = mutated_arg_names(op)
            buffers = [node.kwargs.get(n) for n in names]
            if not all(isinstance(b, fx.Node) and b.target in _ALLOCATIONS and len(b.users) == 1 for b in buffers):
                continue  # a mutated buffer is shared or not a fresh allocation: keep the functional form
            getitems = list(node.users)
            if not all(u.target is operator.getitem for u in getitems):
                continue
            if len(schema_of(op).returns) > 1:
                continue  # mutated buffers would follow several outputs: not handled
            returns_value = len(schema_of(op).returns) == 1
            with graph.inserting_before(node):
                call = graph.call_function(op, kwargs={k: v for k, v in node.kwargs.items()})
            # keep provenance only: "val"/"eager_input_vals" describe the functional HOP, not the op
            call.meta = {k: v for k, v in node.meta.items() if k not in ("val", "eager_input_vals")}
            call.meta["val"] = node.meta["val"][0] if returns_value and "val" in node.meta else None
            for u in getitems:
                idx = u.args[1]
                if idx == 0 and returns_value:
                    u.replace_all_uses_with(call)
                elif idx >= 1:
                    u.replace_all_uses_with(buffers[idx - 1])
                elif idx == 0 and u.users:
                    continue
                graph.erase_node(u)
            if node.users:
                continue
            graph.erase_node(node)
            fixed += 1
        return fixed
