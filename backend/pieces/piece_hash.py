"""Structural hash of a graph piece: equal hashes mean one compiled artifact serves both.

The key holds everything the compiled code depends on, and nothing that only names things:

- placeholders: position and value metadata only (names normalised): tensor class, dtype,
  shape/stride (symbolic ones by expression), layout, device, ``requires_grad``; ``SymInt`` /
  ``SymFloat`` / ``SymBool`` by expression. A graph input that is an object (a hoisted
  ``LayerName``, a script object) counts by type only: the compiled code receives it at run
  time and never bakes its value in.
- nodes: op kind, target, argument structure (nodes by position), constants by value. A ``str``
  constant counts by value, which is why ``VLLM_USE_LAYERNAME=0`` makes every layer's piece unique.
- ``get_attr``: tensors by metadata and content; nested ``GraphModule``s (the bodies of
  higher-order ops: ``checkpoint``'s ``tag_activation_checkpoint`` / ``wrap``, ``torch.cond``'s
  branches, ``flex_attention``'s ``score_mod`` / ``mask_mod``, ``invoke_subgraph``, ...) by their
  structure, recursively, exactly like a piece; a body's placeholders are described by their
  ``meta["val"]`` / ``meta["example_value"]`` (a body has no example args).
- call targets: torch ops and higher-order ops by name, builtins by qualified name (the torch
  version is part of the cache key); a Python function outside torch and the standard library
  also by its code, defaults, closure and the plain-value globals it reads.
- other constants by a stable description of their content: slices, enums, complex numbers,
  ``functools.partial``, opaque value objects (their ``__fx_repr__``), script objects with
  ``__obj_flatten__``.

A value with no stable description (an arbitrary object or ``nn.Module``, a tensor whose bytes
cannot be read) makes the piece **unshareable**: its key includes a token for that object in
this process (a random per-process nonce and a counter; the token is never reused while the
object lives, see ``unshareable_token``). Such a piece shares an artifact only with pieces
holding that very object, in this process, and never matches an entry of the on-disk cache
(it is compiled in every process). ``PieceSignature.unshareable`` says which values did it.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import itertools
import threading
import types
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from layerpass.fingerprint import code_fingerprint
from layerpass.ops.library import op_name



def _target_name(target: Any) -> str:
    """``namespace.op.overload`` for torch ops, ``module.qualname`` for Python callables."""
    if isinstance(target, str):
        return target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return op_name(target, overload=True)
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order.{target.name()}"
    qualname = getattr(target, "__qualname__", None)
    return f"{getattr(target, '__module__', '')}.{qualname}" if qualname else str(target)


# ops whose str argument is a diagnostic message, not something a layer passes (not listed as constants)
_MESSAGE_OPS = {torch.ops.aten._assert_scalar.default, torch.ops.aten._assert_async.msg}

# modules whose functions are keyed by name: their code is fixed by the torch / Python version
_LIBRARY_MODULES = {"torch", "operator", "_operator", "math", "builtins", "functools", "itertools", "typing",
                    "collections", "abc", "copy", "contextlib", "enum", "numbers"}


def _is_library(module: Any) -> bool:
    return isinstance(module, str) and module.split(".")[0] in _LIBRARY_MODULES


# ------------------------------------------------------------------------ unshareable values
_PROCESS_NONCE = uuid.uuid4().hex[:16]
_tokens: dict[int, tuple[Any, str]] = {}  # id(value) -> (weakref to it, or the value itself; its token)
_tokens_lock = threading.Lock()
_token_counter = itertools.count()


def _forget(key: int, ref: weakref.ref) -> None:
    with _tokens_lock:
        entry = _tokens.get(key)
        if entry is not None and entry[0] is ref:
            del _tokens[key]


def unshareable_token(value: Any) -> str:
    """A token for ``value`` that no other object and no other process ever gets.

    The same object gets the same token for as long as it lives (pieces holding the very same
    object may share). The entry is dropped when the object dies (a weak reference), or, for an
    object that cannot be weakly referenced, the object is kept alive so its ``id`` is never reused."""
    key = id(value)
    with _tokens_lock:
        entry = _tokens.get(key)
        if entry is not None:
            ref, token = entry
            if (ref() if isinstance(ref, weakref.ref) else ref) is value:
                return token
        token = f"{_PROCESS_NONCE}.{next(_token_counter)}"
        try:
            held: Any = weakref.ref(value, functools.partial(_forget, key))
        except TypeError:
            held = value
        _tokens[key] = (held, token)
        return token


# ------------------------------------------------------------------------ values
_PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter, torch._subclasses.fake_tensor.FakeTensor)


def _tensor_meta(t: torch.Tensor) -> tuple[Any, ...]:
    cls = type(t)
    kind = "Tensor" if cls in _PLAIN_TENSOR_TYPES else f"{cls.__module__}.{cls.__qualname__}"
    strided = t.layout == torch.strided
    return ("tensor", kind, str(t.dtype), tuple(str(s) for s in t.shape),
            tuple(str(s) for s in t.stride()) if strided else str(t.layout), str(t.device), bool(t.requires_grad))


def describe_value(value: Any) -> Any:
    """Metadata of a piece input that the compiled code specialises on (never a layer name's value).

    An object input (a hoisted ``LayerName``, a script object) is described by its type only:
    the compiled code receives it at run time."""
    if isinstance(value, torch.Tensor):
        return _tensor_meta(value)
    if isinstance(value, torch.SymInt):
        return ("symint", str(value.node.expr))
    if isinstance(value, torch.SymFloat):
        return ("symfloat", str(value.node.expr))
    if isinstance(value, torch.SymBool):
        return ("symbool", str(value.node.expr))
    if isinstance(value, (int, float, bool)) or value is None:
        return ("scalar", type(value).__name__, value)
    return ("object", type(value).__module__, type(value).__qualname__)


def _fetch_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _sorted_items(d: dict[Any, Any]) -> list[tuple[Any, Any]]:
    try:
        return sorted(d.items())
    except TypeError:
        return sorted(d.items(), key=lambda kv: (type(kv[0]).__qualname__, repr(kv[0])))


@dataclass
class PieceSignature:
    key: str  # full structural hash
    shape_key: str  # the same with str / opaque constants masked: equal shape_key, different key => they differ
    constants: list[tuple[str, str, Any]] = field(default_factory=list)  # (node name, op target, str constant)
    # values with no stable description (see the module docstring): non-empty => the key matches
    # no other object's piece and no on-disk cache entry
    unshareable: list[str] = field(default_factory=list)


class _Hasher:
    """Describes one piece: its graph, nested graphs (memoised by identity), constants, callables."""

    def __init__(self) -> None:
        self.constants: list[tuple[str, str, Any]] = []
        self.unshareable: list[str] = []
        self._graphs: dict[int, tuple[str, str]] = {}
        self._code: dict[int, Any] = {}
        self._content: dict[int, Any] = {}
        self._keep: list[Any] = []  # memo keys are ids: keep the objects alive while hashing

    # -- things with no stable description ------------------------------------------
    def opaque(self, value: Any, why: str) -> tuple[str, ...]:
        what = f"{why}: {type(value).__module__}.{type(value).__qualname__}"
        if what not in self.unshareable:
            self.unshareable.append(what)
        return ("unshareable", type(value).__qualname__, unshareable_token(value))

    # -- graphs ------------------------------------------------------------------------
    def graph(self, gm: fx.GraphModule, placeholders: Sequence[Any] | None, prefix: str) -> tuple[str, str]:
        """(full, masked) digests of ``gm``. ``placeholders``: descriptions of its inputs; None for a
        nested body, whose placeholders are described by their own metadata."""
        if placeholders is None and id(gm) in self._graphs:
            return self._graphs[id(gm)]
        full, masked = hashlib.sha256(), hashlib.sha256()
        index: dict[fx.Node, int] = {}
        ph_iter = iter(placeholders) if placeholders is not None else None
        for i, node in enumerate(gm.graph.nodes):
            index[node] = i
            if node.op == "placeholder":
                if ph_iter is not None:
                    desc = next(ph_iter)
                else:
                    meta = node.meta
                    val = meta["val"] if "val" in meta else meta.get("example_value", _MISSING)
                    desc = ("no-meta",) if val is _MISSING else describe_value(val)
                items = (("ph", desc), ("ph", desc))
            elif node.op in ("get_attr", "call_module"):
                name = f"{prefix}{node.name}"
                try:
                    attr = _fetch_attr(gm, node.target)
                except AttributeError:
                    attr = _MISSING
                if attr is _MISSING:
                    d = self.opaque(node, f"{node.op} {node.target!r} not found")
                    items = ((node.op, d, self.args(node.args, index, node, False, name)),
                             (node.op, d, self.args(node.args, index, node, True, name)))
                else:
                    items = tuple((node.op, self.value(attr, mask, name),
                                   self.args(node.args, index, node, mask, name),
                                   self.args(node.kwargs, index, node, mask, name)) for mask in (False, True))
            else:
                target = self.callable(node.target) if node.op == "call_function" else node.target
                items = tuple(
                    (node.op, target, self.args(node.args, index, node, mask, prefix),
                     self.args(node.kwargs, index, node, mask, prefix))
                    for mask in (False, True)
                )
            full.update(repr(items[0]).encode())
            masked.update(repr(items[1]).encode())
        out = (full.hexdigest(), masked.hexdigest())
        if placeholders is None:
            self._keep.append(gm)
            self._graphs[id(gm)] = out
        return out

    def args(self, a: Any, index: dict[fx.Node, int], node: fx.Node, mask: bool, prefix: str) -> Any:
        if isinstance(a, fx.Node):
            return ("%", index[a])
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(self.args(x, index, node, mask, prefix) for x in a))
        if isinstance(a, dict):
            return ("dict", tuple((self.key(k), self.args(v, index, node, mask, prefix)) for k, v in _sorted_items(a)))
        if isinstance(a, slice):
            return ("slice", tuple(self.args(x, index, node, mask, prefix) for x in (a.start, a.stop, a.step)))
        if isinstance(a, str):
            if not mask and node.target not in _MESSAGE_OPS:
                self.constants.append((f"{prefix}{node.name}" if prefix else node.name, _target_name(node.target), a))
            return ("str", "?" if mask else a)
        return self.value(a, mask, prefix)

    # -- constants -----------------------------------------------------------------------
    def key(self, k: Any) -> Any:
        """A dict key (a kwarg name, an option name): never masked, a name is structure."""
        return k if isinstance(k, str) else self.value(k, False)

    def value(self, a: Any, mask: bool, prefix: str = "") -> Any:
        """A constant (an argument or a ``get_attr`` value), by content."""
        if isinstance(a, enum.Enum):  # before int: an IntEnum is an int
            return ("enum", type(a).__module__, type(a).__qualname__, a.name)
        if isinstance(a, (int, float, bool)) or a is None:
            return (type(a).__name__, a)
        if isinstance(a, str):
            return ("str", "?" if mask else a)
        if isinstance(a, complex):
            return ("complex", repr(a))
        if a is Ellipsis:
            return ("...",)
        if isinstance(a, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
            return ("torch", str(a))
        if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return ("sym", type(a).__name__, str(a.node.expr))
        if isinstance(a, fx.GraphModule):
            full, masked = self.graph(a, None, f"{prefix}.")
            return ("graph", masked if mask else full)
        if isinstance(a, torch.Tensor):
            return ("tensor-const", _tensor_meta(a), self.tensor_content(a))
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(self.value(x, mask, prefix) for x in a))
        if isinstance(a, (set, frozenset)):
            return (type(a).__name__, tuple(sorted(repr(self.value(x, mask, prefix)) for x in a)))
        if isinstance(a, dict):
            return ("dict", tuple((self.key(k), self.value(v, mask, prefix)) for k, v in _sorted_items(a)))
        if isinstance(a, slice):
            return ("slice", tuple(self.value(x, mask, prefix) for x in (a.start, a.stop, a.step)))
        if hasattr(a, "__fx_repr__"):  # an opaque value object: this is how FX codegen rebuilds it
            try:
                return ("opaque-const", "?" if mask else a.__fx_repr__()[0])
            except Exception:
                return self.opaque(a, "__fx_repr__ failed")
        if isinstance(a, (torch.ScriptObject, torch._library.fake_class_registry.FakeScriptObject)):
            real = getattr(a, "real_obj", a)  # a fake script object wraps the real one
            flat = getattr(real, "__obj_flatten__", None)
            if flat is None:
                return self.opaque(a, "script object without __obj_flatten__")
            try:
                name = getattr(a, "script_class_name", None) or real._type().qualified_name()
                return ("script-object", str(name), self.value(flat(), mask, prefix))
            except Exception:
                return self.opaque(a, "script object's __obj_flatten__ failed")
        if isinstance(a, nn.Module):
            return self.opaque(a, "nn.Module that is not a GraphModule")
        if isinstance(a, type) or callable(a):
            return self.callable(a)
        return self.opaque(a, "constant with no stable description")

    def tensor_content(self, t: torch.Tensor) -> Any:
        if id(t) not in self._content:  # hashed once per piece, not once per key variant
            self._keep.append(t)
            self._content[id(t)] = self._tensor_content(t)
        return self._content[id(t)]

    def _tensor_content(self, t: torch.Tensor) -> Any:
        if t.device.type == "meta":
            return None
        if torch._subclasses.fake_tensor.is_fake(t):
            return self.opaque(t, "fake tensor constant (no content)")
        try:
            data = t.detach().resolve_conj().resolve_neg().cpu().contiguous().reshape(-1).view(torch.uint8)
            return hashlib.sha256(data.numpy().tobytes()).hexdigest()
        except Exception:
            return self.opaque(t, "tensor constant whose bytes cannot be read")

    # -- callables -----------------------------------------------------------------------
    def callable(self, fn: Any) -> Any:
        if isinstance(fn, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)):
            return ("op", _target_name(fn))
        if isinstance(fn, functools.partial):
            return ("partial", self.callable(fn.func), self.value(fn.args, False), self.value(fn.keywords, False))
        if isinstance(fn, types.FunctionType):
            name = _target_name(fn)
            if _is_library(fn.__module__):
                return ("fn", name)
            return ("fn", name, self.function_body(fn))
        if isinstance(fn, types.MethodType):
            owner = fn.__self__
            if isinstance(owner, (type, types.ModuleType)):
                return ("method", self.callable(fn.__func__), _target_name(owner) if isinstance(owner, type) else owner.__name__)
            return ("method", self.callable(fn.__func__), self.value(owner, False))
        if isinstance(fn, (types.BuiltinFunctionType, types.MethodDescriptorType, types.WrapperDescriptorType,
                           types.ClassMethodDescriptorType, types.MethodWrapperType)):
            owner = getattr(fn, "__self__", None)
            if owner is None or isinstance(owner, (type, types.ModuleType)):
                return ("builtin", _target_name(fn))
            return ("builtin", _target_name(fn), self.value(owner, False))
        if isinstance(fn, type):
            if _is_library(fn.__module__):
                return ("type", _target_name(fn))
            return self.opaque(fn, "user class as a call target")
        if hasattr(fn, "__fx_repr__"):
            return self.value(fn, False)
        return self.opaque(fn, "callable with no stable description")

    def function_body(self, fn: types.FunctionType) -> Any:
        """A user function's code, defaults, closure and the plain-value globals it reads."""
        if id(fn) in self._code:
            return self._code[id(fn)]
        self._code[id(fn)] = ("recursive", _target_name(fn))  # a cycle through globals
        self._keep.append(fn)
        names = _code_names(fn.__code__)
        globals_: list[tuple[str, Any]] = []
        for name in sorted(names):
            if name not in fn.__globals__:
                continue
            g = fn.__globals__[name]
            if isinstance(g, (types.ModuleType, type)) or isinstance(g, torch._ops.OpOverloadPacket):
                continue  # a module or class by name (in co_names); its contents are not followed
            if isinstance(g, types.FunctionType) or callable(g):
                globals_.append((name, self.callable(g)))
            else:
                globals_.append((name, self.value(g, False)))
        closure = tuple(self.value(_cell_value(c), False) for c in fn.__closure__ or ())
        out = (code_fingerprint(fn.__code__), self.value(fn.__defaults__, False), self.value(fn.__kwdefaults__, False),
               closure, tuple(globals_))
        self._code[id(fn)] = out
        return out


_MISSING = object()


def _cell_value(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:
        return ("empty-cell",)


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _code_names(c)
    return names


def piece_signature(gm: fx.GraphModule, example_args: Sequence[Any]) -> PieceSignature:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_args):
        raise ValueError(f"piece has {len(placeholders)} inputs but {len(example_args)} example args were given")
    hasher = _Hasher()
    full, masked = hasher.graph(gm, [describe_value(a) for a in example_args], "")
    return PieceSignature(full[:32], masked[:32], hasher.constants, hasher.unshareable)
