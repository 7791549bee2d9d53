"""Structural hash of a graph piece: equal hashes mean one compiled artifact serves both.

Placeholder names are normalised (only position and value metadata count); op targets,
argument structure, constants, dtypes, shapes/strides (symbolic ones by expression) count.
A hoisted ``LayerName`` input counts by type only; a ``str`` constant counts by value,
which is why ``VLLM_USE_LAYERNAME=0`` makes every layer's piece unique.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx


def _target_name(target: Any) -> str:
    """``namespace.op.overload`` for torch ops, ``module.qualname`` for Python callables."""
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._schema.name.split('::')[-1]}.{target._overloadname}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return str(target._qualified_op_name).replace("::", ".")
    qualname = getattr(target, "__qualname__", None)
    return f"{getattr(target, '__module__', '')}.{qualname}" if qualname else str(target)


# ops whose str argument is a diagnostic message, not something a layer passes (not listed as constants)
_MESSAGE_OPS = {torch.ops.aten._assert_scalar.default, torch.ops.aten._assert_async.msg}


def describe_value(value: Any) -> Any:
    """Metadata of a piece input that the compiled code specialises on (never a layer name's value)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), tuple(str(s) for s in value.shape), tuple(str(s) for s in value.stride()),
                value.device.type, bool(value.requires_grad))
    if isinstance(value, torch.SymInt):
        return ("symint", str(value.node.expr))
    if isinstance(value, (int, float, bool)) or value is None:
        return ("scalar", type(value).__name__, value)
    return ("object", type(value).__module__, type(value).__qualname__)


@dataclass
class PieceSignature:
    key: str  # full structural hash
    shape_key: str  # the same with str / opaque constants masked: equal shape_key, different key => they differ
    constants: list[tuple[str, str, Any]] = field(default_factory=list)  # (node name, op target, str constant)


def piece_signature(gm: fx.GraphModule, example_args: Sequence[Any]) -> PieceSignature:
    full, masked = hashlib.sha256(), hashlib.sha256()
    index: dict[fx.Node, int] = {}
    constants: list[tuple[str, str, Any]] = []

    def norm(a: Any, node: fx.Node, mask: bool) -> Any:
        if isinstance(a, fx.Node):
            return ("%", index[a])
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(norm(x, node, mask) for x in a))
        if isinstance(a, dict):
            return ("dict", tuple((k, norm(v, node, mask)) for k, v in sorted(a.items())))
        if isinstance(a, str):
            if not mask and node.target not in _MESSAGE_OPS:
                constants.append((node.name, _target_name(node.target), a))
            return ("str", "?" if mask else a)
        if isinstance(a, (int, float, bool)) or a is None:
            return (type(a).__name__, a)
        if isinstance(a, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
            return ("torch", str(a))
        if hasattr(a, "__fx_repr__"):
            return ("opaque-const", "?" if mask else a.__fx_repr__()[0])
        return ("other", type(a).__qualname__, "?" if mask else repr(a))

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_args):
        raise ValueError(f"piece has {len(placeholders)} inputs but {len(example_args)} example args were given")
    args_iter = iter(example_args)
    for i, node in enumerate(gm.graph.nodes):
        index[node] = i
        if node.op == "placeholder":
            item = ("ph", describe_value(next(args_iter)))
            items = (item, item)
        elif node.op == "get_attr":
            attr = getattr(gm, node.target)
            desc = describe_value(attr)
            if isinstance(attr, torch.Tensor) and attr.device.type != "meta":
                desc = (desc, hashlib.sha256(attr.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest())
            items = (("attr", desc), ("attr", desc))
        else:
            items = tuple(
                (node.op, _target_name(node.target), norm(node.args, node, mask), norm(node.kwargs, node, mask))
                for mask in (False, True)
            )
        full.update(repr(items[0]).encode())
        masked.update(repr(items[1]).encode())
    return PieceSignature(full.hexdigest()[:32], masked.hexdigest()[:32], constants)
