"""The one helper every layerpass op registers through (``torch.library``, namespace ``layerpass``).

``@layerpass_op("name", mutates_args=..., fake=...)`` on a plain-torch function gives:
the schema inferred from its annotations (so a ``LayerNameType`` argument becomes the
hoisted opaque type or ``str``), the function as the CPU (and fallback) kernel, the fake
(meta) implementation, optional tags, and a CUDA slot that ``register_cuda_kernel``
fills (the Triton kernels do, when triton is importable).

Also the one spelling of an op's name (``op_name``, on torch's public names) and the one reader
of an op's schema (``schema_of``) for every pass, backend module and test.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import torch

NAMESPACE = "layerpass"
OPS: dict[str, Any] = {}  # op name -> torch.library.CustomOpDef


def layerpass_op(
    name: str,
    *,
    mutates_args: Iterable[str] = (),
    fake: Callable[..., Any] | None = None,
    tags: Iterable[torch.Tag] = (),
) -> Callable[[Callable[..., Any]], Any]:
    """Register ``fn`` as ``torch.ops.layerpass.<name>`` with ``fake`` as its fake impl."""

    def decorate(fn: Callable[..., Any]) -> Any:
        if name in OPS:
            raise ValueError(f"op layerpass::{name} is already registered")
        kwargs: dict[str, Any] = {"mutates_args": tuple(mutates_args)}
        tag_tuple = tuple(tags)
        if tag_tuple:
            kwargs["tags"] = tag_tuple
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", **kwargs)(fn)
        if fake is not None:
            op.register_fake(fake)
        OPS[name] = op
        return op

    return decorate


def sizes_differ(a: Any, b: Any) -> bool:
    """Whether two sizes (ints) or shapes (sequences of them) differ, for argument checks that also
    run at trace time on symbolic sizes (the fake kernels): a size only known at run time (an
    unbacked symbol, as in a region trace) compares as equal without a guard, so a check never makes
    a trace fail or specialise; the eager entry points compare concrete sizes."""
    from torch.fx.experimental.symbolic_shapes import guard_or_false

    if isinstance(a, (int, torch.SymInt)) and isinstance(b, (int, torch.SymInt)):
        return guard_or_false(a != b)
    a, b = tuple(a), tuple(b)
    return len(a) != len(b) or any(guard_or_false(x != y) for x, y in zip(a, b))


def register_cuda_kernel(name: str, kernel: Callable[..., Any]) -> None:
    """Serve ``layerpass::<name>`` on CUDA tensors with ``kernel`` (same signature as the op)."""
    if name not in OPS:
        raise KeyError(f"unknown layerpass op {name!r}; registered ops: {sorted(OPS)}")
    OPS[name].register_kernel("cuda")(kernel)


def op_overload(name: str) -> torch._ops.OpOverload:
    """``torch.ops.layerpass.<name>.default``: what appears as a node target in graphs."""
    return getattr(torch.ops.layerpass, name).default


_TORCH_OPS_REPR = re.compile(r"^torch\._ops\.(\w+)\.(?:.*\.)?(\w+)$")  # a packet rendered through its module


def op_name(target: object, overload: bool = False) -> str | None:
    """The one spelling of an op's name: ``"namespace.op"``, or ``"namespace.op.overload"``
    with ``overload=True`` (when the target names an overload).

    ``target`` is an ``OpOverload``, an ``OpOverloadPacket``, or a string naming one
    (``"ns::op"``, ``"ns.op"``, ``"ns.op.overload"``, ``"torch._ops.ns.<...>.op"``);
    anything else (a Python callable, a malformed string) gives ``None``."""
    ov: str | None = None
    if isinstance(target, torch._ops.OpOverload):
        # public spellings: str(overload) is "ns.op.overload", str(its packet) is "ns.op"
        packet = str(target.overloadpacket)
        ns, op = packet.split(".")
        ov = str(target)[len(packet) + 1:]
    elif isinstance(target, torch._ops.OpOverloadPacket):
        ns, op = str(target).split(".")
    elif isinstance(target, str):
        m = _TORCH_OPS_REPR.match(target)
        parts = [m.group(1), m.group(2)] if m else target.replace("::", ".").split(".")
        if len(parts) not in (2, 3) or not all(parts):
            return None
        ns, op, ov = parts[0], parts[1], parts[2] if len(parts) == 3 else None
    else:
        return None
    return f"{ns}.{op}.{ov}" if overload and ov else f"{ns}.{op}"


def schema_of(op: torch._ops.OpOverload) -> torch.FunctionSchema:
    """``op``'s schema: its arguments (names, alias and mutation info) and returns.

    The one place layerpass reads torch's private schema attribute of an ``OpOverload``: torch 2.13
    has no public accessor for an op's arguments, so passes and tests that need them ask here."""
    return op._schema
