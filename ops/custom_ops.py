"""``CompilationConfig.custom_ops`` (vLLM's spelling) resolved against the op table, once.

Which lowerable ops keep their custom kernel and which the ``lowering`` pass replaces by their
native code: the config resolves its ``custom_ops`` here when it is made, and the pass is handed
the result (``CompilationConfig.lowered_ops()``)."""

from __future__ import annotations

from collections.abc import Iterable

from .library import OPS, lowerable_ops


def resolve_custom_ops(custom_ops: Iterable[str], what: str = "CompilationConfig.custom_ops") -> tuple[str, ...]:
    """The ops to lower (sorted) for a vLLM-style ``custom_ops`` list.

    ``"none"``: no lowerable op keeps its custom kernel (everything lowerable is lowered; also what
    an empty list means); ``"all"``: every op keeps it (nothing lowered); then ``"+name"`` keeps
    ``name``'s custom kernel and ``"-name"`` lowers it. ``TypeError`` / ``ValueError`` for anything
    else, naming the entry and the allowed names."""
    if isinstance(custom_ops, (str, bytes)) or not isinstance(custom_ops, (tuple, list)):
        raise TypeError(f"{what} must be a tuple of str ('none', 'all', '+name', '-name'), "
                        f"got {type(custom_ops).__name__} {custom_ops!r}")
    entries = list(custom_ops)
    lowerable = lowerable_ops()
    allowed = ", ".join(lowerable)
    for e in entries:
        if not isinstance(e, str):
            raise TypeError(f"{what} entries must be str ('none', 'all', '+name' or '-name'), got "
                            f"{type(e).__name__} {e!r}")
    if "all" in entries and "none" in entries:
        raise ValueError(f"{what} names both 'all' and 'none'; give at most one of them")
    lowered = set() if "all" in entries else set(lowerable)
    seen: dict[str, str] = {}
    for e in entries:
        if e in ("all", "none"):
            continue
        sign, name = e[:1], e[1:]
        if sign not in ("+", "-") or not name:
            raise ValueError(f"{what} entry {e!r} must be 'none', 'all', '+name' (keep the op's custom kernel) "
                             f"or '-name' (lower it to code Inductor generates); names: {allowed}")
        if name in OPS and not OPS[name].lowers:
            raise ValueError(f"{what} entry {e!r}: layerpass.{name} always keeps its custom kernel (it is not "
                             f"lowerable); lowerable ops: {allowed}")
        if name not in lowerable:
            raise ValueError(f"{what} entry {e!r}: {name!r} is not a lowerable layerpass op; lowerable ops: {allowed}")
        if seen.get(name, sign) != sign:
            raise ValueError(f"{what} names {name!r} both with '+' and '-'")
        seen[name] = sign
        if sign == "+":
            lowered.discard(name)
        else:
            lowered.add(name)
    return tuple(sorted(lowered))
