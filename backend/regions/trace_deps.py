"""What a traced region depends on beyond the guards torch saves, and the checks that keep it fresh.

torch's ``aot_compile`` saves a traced program with the guards it can serialise. It drops the rest
(every guard on a global, and ID / function / closure / module matches), and nothing in a saved
program checks the code it inlined. So a program traced before an edit of a helper function, a
parent-class method, a helper object's method or a module constant would still load and run the
old code. ``TraceDeps`` records, at trace time:

- ``codes``: every code object Dynamo traced through (the layer's ``forward``, its base classes'
  and helpers' methods, module functions, layerpass's own layers): module, qualified name and a
  fingerprint of the bytecode (names, constants and nested code, line numbers excluded, so a
  moved function still matches and an edited one never does);
- ``guards``: each guard torch dropped, as its source expression (``G['FACTOR']``,
  ``G['__import_mod'].helper``, ``self.qm.fn``) with what it must equal: a constant's value, a
  type, or an object's identity (fingerprinted by name and code across processes).

Two checks use them:

- ``stale_reason()`` (loading a saved program, any process): every recorded code is found again
  by module and qualified name with the same fingerprint, every dropped guard evaluates to an
  equal fingerprint. A difference names the function or global, and the program is not used.
- ``changed()`` (in-process, once per step per region): the live functions are the very code
  objects traced and the dropped globals the very objects (or equal constants) seen at trace or
  load time; a monkeypatched helper, method or global makes the region stale, so it is traced again.

Guards rooted at the layer (``self....``) are checked per layer call by ``check_locals``; the
models seen so far have none. The code objects traced come from the hook on torch's traced-code
list (``backend/torch_patches.recording_traced_code``); the guard types torch cannot serialise
are read here.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import importlib
import inspect
import re
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from layerpass.fingerprint import code_fingerprint, value_fingerprint

# Guard types whose values are compared for equality (constants) or by type only; every other
# dropped guard is an identity match (functions, modules, classes, builtins, objects).
_EQUALS = ("CONSTANT_MATCH", "EQUALS_MATCH")
_TYPE = ("TYPE_MATCH",)


def unsaveable_guard_types() -> tuple[str, ...]:
    from torch._dynamo.guards import CheckFunctionManager

    return tuple(CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES)


# -- recording ---------------------------------------------------------------------------------
@dataclass
class TracedCode:
    module: str
    qualname: str
    fingerprint: str


@dataclass
class DroppedGuard:
    expr: str  # Dynamo's source: "G['x'].y" (global) or "self.x" (the layer's frame)
    kind: str  # "equals", "type" or "identity"
    fingerprint: str


@dataclass
class TraceDeps:
    codes: list[TracedCode] = field(default_factory=list)
    guards: list[DroppedGuard] = field(default_factory=list)
    unsaveable: str | None = None  # why a saved copy could not be checked on load (then it is not saved)
    # in-process: the objects the trace saw, for the cheap identity check
    _live_codes: list[tuple[TracedCode, Any]] = field(default_factory=list, repr=False)  # (code, the object named so)
    _live_globals: list[tuple[DroppedGuard, Callable[[], Any], Any, tuple[Any, ...]]] = field(default_factory=list, repr=False)
    _local_checks: list[tuple[DroppedGuard, list[Any]]] = field(default_factory=list, repr=False)  # (guard, accepted)
    _all_locals: Any = field(default=None, repr=False)  # the local checks' expressions as one code object

    # -- saving -------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"codes": [vars(c) for c in self.codes], "guards": [vars(g) for g in self.guards]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TraceDeps:
        return cls([TracedCode(**c) for c in data["codes"]], [DroppedGuard(**g) for g in data["guards"]])

    # -- checks -------------------------------------------------------------------
    @property
    def has_local_checks(self) -> bool:
        return bool(self._local_checks)

    def stale_reason(self, root: Callable[..., Any]) -> str | None:
        """Why this (saved) trace does not describe the code loaded now, or None; on None the
        live objects are bound for ``changed()``."""
        live_codes = []
        for c in self.codes:
            found = find_code(c.module, c.qualname)
            match = next((code for code in found if code_fingerprint(code) == c.fingerprint), None)
            if match is None:
                what = "is gone" if not found else "changed"
                return f"{c.module}.{c.qualname} ({_file_of(c.module)}) {what} since the program was traced"
            live_codes.append((c, _resolve(c.module, c.qualname)))
        live_globals = []
        for g in self.guards:
            if not is_global(g.expr):
                continue
            getter = _global_getter(g.expr, root)
            try:
                value = getter()
            except Exception:
                return f"global {_pretty(g.expr)} is gone since the program was traced"
            if _fingerprint_for(g.kind, value) != g.fingerprint:
                return f"global {_pretty(g.expr)} changed since the program was traced"
            live_globals.append((g, getter, value, _memo_key(g, root, value)))
        self._live_codes, self._live_globals = live_codes, live_globals
        self._local_checks = [(g, []) for g in self.guards if not is_global(g.expr)]
        self._all_locals = None
        return None

    def changed(self, checked: set[Any] | None = None) -> str | None:
        """In-process, after trace or load: a traced function or a dropped global that is no longer
        the object traced (monkeypatched, reloaded), or None. ``checked``: what earlier calls in
        this step found unchanged (shared by the regions of one model, so each is checked once)."""
        checked = set() if checked is None else checked
        for c, obj in self._live_codes:
            if obj is None or (c.module, c.qualname, id(obj)) in checked:
                continue
            if _resolve_path(c.module, _qualname_path(c.qualname)) is not obj:
                return f"{c.module}.{c.qualname} was replaced since the region was traced"
            checked.add((c.module, c.qualname, id(obj)))
        for g, getter, value, memo_key in self._live_globals:
            if memo_key in checked:
                continue
            try:
                now = getter()
            except Exception:
                return f"global {_pretty(g.expr)} is gone"
            if not _same(g.kind, now, value):
                return f"global {_pretty(g.expr)} changed since the region was traced"
            checked.add(memo_key)
        return None

    def check_locals(self, f_locals: dict[str, Any]) -> bool:
        """The dropped guards rooted at the layer's frame, for one call. An identity guard accepts
        the objects seen at trace time, and any other whose fingerprint is equal (then remembered,
        so the next layer's call is an identity compare)."""
        checks = self._local_checks
        if self._all_locals is None:  # every expression in one code object: one eval per call
            self._all_locals = compile(f"({''.join(f'({g.expr}),' for g, _ in checks)})", "<guards>", "eval")
        try:
            values = eval(self._all_locals, {}, f_locals)  # noqa: S307 (Dynamo's own source expressions)
        except Exception:
            return False  # one of them cannot be read for this layer
        for (g, accepted), value in zip(checks, values):
            if g.kind == "identity":
                if any(_shallow_same(value, seen) for seen in accepted):
                    continue
                if value_fingerprint(value) != g.fingerprint:
                    return False
                if len(accepted) < 64:
                    accepted.append(value)
            elif _fingerprint_for(g.kind, value) != g.fingerprint:
                return False
        return True


def _memo_key(g: DroppedGuard, root: Callable[..., Any], value: Any) -> tuple[Any, ...]:
    """Names one global check: the regions of one model read mostly the same globals, so one
    check per step serves them all (the expression, whose globals, what is compared)."""
    return g.expr, id(getattr(root, "__globals__", None)), g.kind, id(value)


def _shallow_same(now: Any, then: Any) -> bool:
    """Identity, or for a container rebuilt by each evaluation (``dict(type(G[...]).__dict__)``)
    the same keys holding the very same objects."""
    if now is then:
        return True
    if type(now) is not type(then):
        return False
    if isinstance(now, dict):
        return now.keys() == then.keys() and all(v is then[k] for k, v in now.items())
    if isinstance(now, (list, tuple)):
        return len(now) == len(then) and all(a is b for a, b in zip(now, then))
    return False


def _same(kind: str, now: Any, then: Any) -> bool:
    if isinstance(then, (dict, list, tuple)):
        return _shallow_same(now, then) if kind != "equals" else type(now) is type(then) and bool(now == then)
    if kind == "equals":
        return type(now) is type(then) and bool(now == then)
    if kind == "type":
        return type(now) is type(then)
    return now is then


def _fingerprint_for(kind: str, value: Any) -> str:
    if kind == "type":
        return f"type:{type(value).__module__}.{type(value).__qualname__}"
    return value_fingerprint(value)


_GLOBAL_ROOT = re.compile(r"\bG\[")


def is_global(expr: str) -> bool:
    """Whether Dynamo's source expression reads the globals (``G['x']``, ``type(G['x']).y``, ...)
    rather than the traced frame's locals."""
    return _GLOBAL_ROOT.search(expr) is not None


def _pretty(expr: str) -> str:
    """``G['__import_a_dot_b'].X`` -> ``a.b.X``."""
    if expr.startswith("G['__import_"):
        head, _, rest = expr[len("G['__import_"):].partition("']")
        return head.replace("_dot_", ".") + rest
    if expr.startswith("G['"):
        head, _, rest = expr[3:].partition("']")
        return head + rest
    return expr


def _file_of(module: str) -> str:
    mod = sys.modules.get(module)
    return getattr(mod, "__file__", None) or module


_ATTR_CHAIN = re.compile(r"^G\['([^']+)'\]((?:\.[A-Za-z_][A-Za-z0-9_]*)*)$")
_MISSING = object()


def _global_getter(expr: str, root: Callable[..., Any]) -> Callable[[], Any]:
    """A function reading Dynamo's global source ``expr`` now. ``G`` is the traced function's
    globals, with ``G['__import_a_dot_b']`` the module ``a.b``. The common form (a name and an
    attribute chain) is read with dict lookups and ``getattr``: it runs once per step per guard."""
    root_globals = getattr(root, "__globals__", {})
    m = _ATTR_CHAIN.match(expr)
    if m is None:
        code = compile(expr, "<guard>", "eval")
        return lambda: eval(code, {"G": _Globals(root_globals)})  # noqa: S307 (Dynamo's own source expression)
    name, attrs = m.group(1), tuple(a for a in m.group(2).split(".") if a)
    if name.startswith("__import_"):
        table, key = sys.modules, name[len("__import_"):].replace("_dot_", ".")
    elif name.startswith("__builtins_dict__"):
        table, key = {name: builtins.__dict__}, name
    else:
        table, key = root_globals, name

    def read() -> Any:
        obj = table.get(key, _MISSING)
        for a in attrs:
            if obj is _MISSING:
                break
            obj = getattr(obj, a, _MISSING)
        if obj is _MISSING:
            raise LookupError(expr)
        return obj

    return read


class _Globals(dict):  # type: ignore[type-arg]
    """Dynamo's ``G`` for expressions that are not a plain attribute chain."""

    def __init__(self, root_globals: dict[str, Any]) -> None:
        super().__init__()
        self.root = root_globals

    def __missing__(self, name: str) -> Any:
        if name.startswith("__import_"):
            return importlib.import_module(name[len("__import_"):].replace("_dot_", "."))
        if name.startswith("__builtins_dict__"):  # Dynamo's alias of the builtins' dict
            return builtins.__dict__
        return self.root[name]


def _resolve(module: str, qualname: str) -> Any:
    """The object now named ``module.qualname`` (looked up in the module's and classes' own
    ``__dict__``, as the qualified name says where it was defined), or None."""
    if "<locals>" in qualname:
        return None
    return _resolve_path(module, _qualname_path(qualname))


@functools.lru_cache(maxsize=4096)
def _qualname_path(qualname: str) -> tuple[str, ...]:
    return tuple(qualname.split("."))


def _resolve_path(module: str, path: tuple[str, ...]) -> Any:
    obj: Any = sys.modules.get(module)
    for name in path:
        if obj is None:
            return None
        obj = getattr(obj, "__dict__", _EMPTY).get(name)
    return obj


_EMPTY: dict[str, Any] = {}


def _codes_of(obj: Any) -> Iterator[types.CodeType]:
    """The code objects of a function, method or property, through decorators' ``__wrapped__``;
    for an object standing in for a function (``kernels``' ``Func`` module), the functions its
    class's ``forward`` closes over."""
    if obj is None:
        return
    if not isinstance(obj, (types.FunctionType, types.MethodType, type, types.ModuleType, staticmethod,
                            classmethod, property)) and callable(obj):
        forward = getattr(type(obj), "forward", None)
        for cell in getattr(forward, "__closure__", None) or ():
            with contextlib.suppress(ValueError):
                if isinstance(cell.cell_contents, types.FunctionType):
                    yield from _codes_of(cell.cell_contents)
        return
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if isinstance(obj, property):
        for f in (obj.fget, obj.fset):
            if f is not None:
                yield from _codes_of(f)
        return
    for _ in range(16):
        code = getattr(obj, "__code__", None)
        if isinstance(code, types.CodeType):
            yield code
        obj = getattr(obj, "__wrapped__", None)
        if obj is None:
            return


def find_code(module: str, qualname: str) -> list[types.CodeType]:
    """Every code object of ``module`` with this qualified name: functions and methods reached
    by name, and for ``<locals>`` names the nested code in their enclosing function's constants."""
    found = list(_codes_of(_resolve(module, qualname)))
    if found or "<locals>" not in qualname:
        return found
    outer = qualname.split(".<locals>.")[0]
    for code in find_code(module, outer):
        found.extend(c for c in _nested(code) if getattr(c, "co_qualname", c.co_name) == qualname)
    return found


def _nested(code: types.CodeType) -> Iterator[types.CodeType]:
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield const
            yield from _nested(const)


def record_deps(codes: Sequence[types.CodeType], dropped: Sequence[Any], root: Callable[..., Any]) -> TraceDeps:
    """``TraceDeps`` of one trace: the code objects Dynamo traced and the guard entries it dropped."""
    deps = TraceDeps()
    seen: set[types.CodeType] = set()
    for code in codes:
        if code in seen:
            continue
        seen.add(code)
        module = inspect.getmodule(code)
        if module is None and code.co_filename.startswith("<frozen "):  # frozen stdlib (_collections_abc)
            module = sys.modules.get(code.co_filename[len("<frozen "):-1])
        qualname = getattr(code, "co_qualname", code.co_name)
        if module is None:
            deps.unsaveable = f"it traced {qualname} ({code.co_filename}), code without a module a new process could check"
            continue
        traced = TracedCode(module.__name__, qualname, code_fingerprint(code))
        deps.codes.append(traced)
        if not any(c is code for c in find_code(traced.module, traced.qualname)):
            deps.unsaveable = f"it traced {traced.module}.{qualname}, which cannot be found again by its name"
        deps._live_codes.append((traced, _resolve(traced.module, traced.qualname)))
    exprs: set[str] = set()
    for entry in dropped:
        if entry.name in exprs or not entry.name:
            continue
        exprs.add(entry.name)
        if not entry.has_value:
            deps.unsaveable = f"torch dropped a guard it cannot describe ({entry.guard_type} on {entry.name})"
            continue
        kind = "equals" if entry.guard_type in _EQUALS else "type" if entry.guard_type in _TYPE else "identity"
        guard = DroppedGuard(entry.name, kind, _fingerprint_for(kind, entry.value))
        deps.guards.append(guard)
        if is_global(entry.name):
            deps._live_globals.append((guard, _global_getter(entry.name, root), entry.value,
                                       _memo_key(guard, root, entry.value)))
        else:
            deps._local_checks.append((guard, [entry.value]))
    return deps


class GuardRecorder:
    """A ``guard_filter_fn`` for ``aot_compile``: drops what torch's own default drops (globals
    and guard types it cannot serialise) and keeps every dropped entry for ``record_deps``."""

    def __init__(self) -> None:
        self.dropped: list[Any] = []
        self._unsaveable = unsaveable_guard_types()

    def __call__(self, entries: Sequence[Any]) -> list[bool]:
        keep = []
        for g in entries:
            types_ = (g.guard_type, *(g.derived_guard_types or ()))
            drop = g.is_global or any(t in self._unsaveable for t in types_)
            if drop:
                self.dropped.append(g)
            keep.append(not drop)
        return keep


def traced_code_of_this_trace() -> list[types.CodeType]:
    """From inside a backend called by Dynamo (not ``aot_compile``): the code it traced."""
    from torch._guards import TracingContext

    ctx = TracingContext.try_get()
    return list(getattr(ctx, "traced_code", None) or [])
