"""The one helper every layerpass op registers through (``torch.library``, namespace ``layerpass``).

``@layerpass_op("name", mutates_args=..., fake=..., check=..., lowers=...)`` on a plain-torch function gives:
the schema inferred from its annotations (so a ``LayerNameType`` argument becomes the
hoisted opaque type or ``str``), the function as the CPU (and fallback) kernel, the fake
(meta) implementation, optional tags, and a CUDA slot that ``register_cuda_kernel``
fills (the Triton kernels do, when triton is importable), and the op's facts in ``OPS`` (``OpDef``:
its native code, its argument check, whether it lowers or splits), which the passes and the
config read instead of lists of their own.

Also the one spelling of an op's name (``op_name``, on torch's public names) and the one reader
of an op's schema (``schema_of``) for every pass, backend module and test.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

NAMESPACE = "layerpass"


@dataclass(frozen=True)
class OpDef:
    """Everything layerpass knows about one of its ops, given once, where the op is defined.

    - ``custom_op``: the ``torch.library.CustomOpDef`` (``register_kernel``, ``register_fake``).
    - ``native``: the op's native implementation in plain torch, functional (for a mutating op:
      its return followed by the new values of the mutated arguments, ``auto_functionalized``'s
      layout); what the CPU kernel runs and what the ``lowering`` pass inlines. ``None`` for an
      op that does not lower.
    - ``check``: the op's argument check, with the op's own parameters; raises ``ValueError``
      saying why it refuses. It runs in eager (the entry points), at trace time (the fake kernel)
      and in the lowering pass on fake sizes, where an unprovable size relation refuses
      (``provable_sizes``). ``None``: the op checks its arguments in its own fake kernel.
    - ``lowers``: the ``lowering`` pass may replace it by ``native`` (``custom_ops`` chooses which).
    - ``splits``: a graph split point (``CompilationConfig.splitting_ops``' default).
    """

    name: str
    custom_op: Any
    native: Callable[..., Any] | None
    check: Callable[..., None] | None
    lowers: bool
    splits: bool


OPS: dict[str, OpDef] = {}  # op name -> its facts, in registration order


def layerpass_op(
    name: str,
    *,
    mutates_args: Iterable[str] = (),
    fake: Callable[..., Any] | None = None,
    check: Callable[..., None] | None = None,
    native: Callable[..., Any] | None = None,
    lowers: bool = False,
    splits: bool = False,
    tags: Iterable[torch.Tag] = (),
) -> Callable[[Callable[..., Any]], Any]:
    """Register ``fn`` as ``torch.ops.layerpass.<name>`` (its CPU kernel) with ``fake`` as its fake
    impl, run after ``check``; ``native`` defaults to ``fn`` (a functional op's kernel is its
    native code); see ``OpDef`` for the facts. Adding an op is this one call: lowering, the
    ``custom_ops`` names and the default splitting ops read them from ``OPS``."""
    mutated = tuple(mutates_args)
    if lowers and splits:
        raise ValueError(f"op layerpass::{name}: a split point runs eagerly between pieces, it cannot also lower")
    if lowers and mutated and native is None:
        raise ValueError(f"op layerpass::{name} mutates {mutated} and lowers: give native=, its functional form "
                         f"(its return, then the new values of {', '.join(mutated)})")

    def decorate(fn: Callable[..., Any]) -> Any:
        if name in OPS:
            raise ValueError(f"op layerpass::{name} is already registered")
        impl = native if native is not None else (fn if lowers else None)
        params = list(inspect.signature(fn).parameters)
        for what, f in (("check", check), ("native", impl)):
            if f is not None and list(inspect.signature(f).parameters) != params:
                raise ValueError(f"op layerpass::{name}: {what} takes {list(inspect.signature(f).parameters)}, "
                                 f"the op takes {params} (it is called with the op's arguments by name)")
        kwargs: dict[str, Any] = {"mutates_args": mutated}
        tag_tuple = tuple(tags)
        if tag_tuple:
            kwargs["tags"] = tag_tuple
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", **kwargs)(fn)
        if fake is not None:
            op.register_fake(fake if check is None else _checked(check, fake))
        OPS[name] = OpDef(name, op, impl, check, lowers, splits)
        return op

    return decorate


def _checked(check: Callable[..., None], fake: Callable[..., Any]) -> Callable[..., Any]:
    def checked_fake(*args: Any, **kwargs: Any) -> Any:
        check(*args, **kwargs)  # trace time: once per compiled piece
        return fake(*args, **kwargs)

    return checked_fake


def lowerable_ops() -> tuple[str, ...]:
    """The ops the ``lowering`` pass can replace by their native code (what ``custom_ops`` names), sorted."""
    return tuple(sorted(n for n, d in OPS.items() if d.lowers))


def always_custom_ops() -> tuple[str, ...]:
    """The ops that always keep their kernel (attention, MoE, collectives, ...), sorted."""
    return tuple(sorted(n for n, d in OPS.items() if not d.lowers))


def split_point_ops() -> tuple[str, ...]:
    """``"layerpass.<name>"`` of the ops that are graph split points: ``splitting_ops``' default."""
    return tuple(f"{NAMESPACE}.{n}" for n, d in OPS.items() if d.splits)


_PROVABLE: contextvars.ContextVar[bool] = contextvars.ContextVar("layerpass_provable_sizes", default=False)


@contextlib.contextmanager
def provable_sizes() -> Iterator[None]:
    """In this block ``sizes_differ`` counts sizes as equal only when that is provable without a
    guard (``statically_known_true``): how the lowering pass asks an op's check whether its
    native code equals the op on a graph's symbolic sizes."""
    token = _PROVABLE.set(True)
    try:
        yield
    finally:
        _PROVABLE.reset(token)


def sizes_differ(a: Any, b: Any) -> bool:
    """Whether two sizes (ints) or shapes (sequences of them) differ, for argument checks that also
    run at trace time on symbolic sizes (the fake kernels): a size only known at run time (an
    unbacked symbol, as in a region trace) compares as equal without a guard, so a check never makes
    a trace fail or specialise; the eager entry points compare concrete sizes. Under
    ``provable_sizes`` an unprovable equality counts as a difference."""
    from torch.fx.experimental.symbolic_shapes import guard_or_false, statically_known_true

    def differ(x: Any, y: Any) -> bool:
        return not statically_known_true(x == y) if _PROVABLE.get() else guard_or_false(x != y)

    if isinstance(a, (int, torch.SymInt)) and isinstance(b, (int, torch.SymInt)):
        return differ(a, b)
    a, b = tuple(a), tuple(b)
    return len(a) != len(b) or any(differ(x, y) for x, y in zip(a, b))


def register_cuda_kernel(name: str, kernel: Callable[..., Any]) -> None:
    """Serve ``layerpass::<name>`` on CUDA tensors with ``kernel`` (same signature as the op)."""
    if name not in OPS:
        raise KeyError(f"unknown layerpass op {name!r}; registered ops: {sorted(OPS)}")
    OPS[name].custom_op.register_kernel("cuda")(kernel)


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
