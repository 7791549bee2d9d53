"""A scoped fix for torch's guard-state pickler, so that traced regions can be saved and loaded.

``aot_compile`` pickles the guards of a traced frame with ``torch._dynamo.guards.GuardsStatePickler``
(torch 2.10+). Four gaps in it make programs that save fine fail to load (or not save) (torch 2.13):

1. For every ``nn.Module`` it reduces, it records each plain attribute that is not a tensor, module
   or callable and not in the guard tree in ``missing_values``, BY id(), and pickles any later
   object with that id as ``_Missing``. ``torch.float32`` is one object, so a module attribute
   ``params_dtype = torch.float32`` (every layerpass linear has one) turns the dtype of every
   tensor pickled after that module into ``_Missing``: ``empty_strided(): argument 'dtype' must
   be torch.dtype, not _Missing``.
2. A function whose qualified name leads to another object (any ``functools.wraps`` decorator:
   transformers' ``GradientCheckpointingLayer`` forward wraps ``deprecate_kwarg``'s wrapper,
   which wraps the layer's own forward) is pickled as ``_Missing`` ("fqn mismatch") even when
   the guards read it: transformers 5.25's decoder layers guard on the constants in the
   deprecation wrapper's closure (``L['forward'].__closure__[3].cell_contents == False``), and
   rebuilding the guards fails: ``'_Missing' object has no attribute '__closure__'``.
3. A method bound in an instance's ``__dict__`` (``module.forward = MethodType(f, module)``, as
   ``models/hf/hub_kernels.py`` binds) is reduced as ``getattr(instance, name)``, which runs
   while the instance is half restored and finds the CLASS's method: the guards on
   ``module.forward.__func__.__closure__`` are rebuilt on the wrong function (``IndexError``).
4. A tensor is pickled with its ``.grad``, which no guard reads, so it is pickled as ``_Missing``
   and restoring fails: a model that took a training step and then ``.eval()`` for serving
   (parameters holding gradients) gets no warm start (``TypeError: assigned grad expected to be
   a Tensor or None but got grad of type _Missing``).

Inside ``saveable_guards()`` (``backend/regions/torch_patches.py``), and nothing else changes:

1. dtypes, devices, layouts, memory formats and quantisation schemes are never missing: they are
   immutable values pickled by name; saving one where torch left ``_Missing`` adds and changes
   no guard (the guards are rebuilt from the same guard list);
2. a function in the guard tree that its qualified name does not find is saved BY VALUE: code,
   name, qualified name, defaults, closure cells, the attributes the guards read, its globals by
   module name (as torch saves a function defined in local scope). The guards rebuilt on load
   then compare the live function's closure with the values seen at trace time; resolving it by
   name in the loading process would compare the live function with itself, and a changed
   closure constant (another library version) would pass unnoticed;
3. such a bound method, when in the guard tree, is saved as its function and instance;
4. a tensor's gradient that no guard reads is left out (saved as ``None``): gradients are not
   part of a traced inference program. The caller's tensor and its ``.grad`` are not touched.

Anything else a guard does not read is pickled as torch pickles it.

Scope: ``backend/torch_patches.saveable_guards`` installs ``patched_reducer`` as the pickler's
``reducer_override`` while at least one of its blocks is open (nestable, across threads) and puts
torch's back when the last one closes. Only ``aot_compile`` runs that pickler
(``AOTCompiledFunction.serialize`` copies the pickled bytes; loading unpickles, with
``rebuild_function`` / ``rebuild_method`` below), so wrapping the ``aot_compile`` call is enough.
On a torch without that pickler, or whose pickler no longer takes ``missing_values``
(``pickler_class`` returns None), the block does nothing.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
import types
from collections.abc import Callable
from typing import Any

import torch

# Immutable value types torch pickles by name: never "missing", whatever module attribute holds them.
NEVER_MISSING: tuple[type, ...] = (torch.dtype, torch.device, torch.layout, torch.memory_format, torch.qscheme)

def pickler_class() -> type | None:
    """torch's guard-state pickler, if it has the ``missing_values`` logic this module fixes."""
    try:
        from torch._dynamo.guards import GuardsStatePickler
    except ImportError:
        return None
    if not callable(getattr(GuardsStatePickler, "reducer_override", None)):
        return None
    try:
        params = inspect.signature(GuardsStatePickler.__init__).parameters
    except (TypeError, ValueError):
        return None
    return GuardsStatePickler if "missing_values" in params else None


def applies() -> bool:
    """Whether this torch has the pickler ``saveable_guards`` patches (otherwise it is a no-op)."""
    return pickler_class() is not None


def _found_by_name(fn: types.FunctionType) -> bool:
    """Whether ``fn``'s module and qualified name lead back to ``fn`` (torch's "fqn" check)."""
    found: Any = sys.modules.get(fn.__module__)
    if found is None:
        return True  # torch leaves it to pickle (by reference); not ours to change
    for part in fn.__qualname__.split("."):
        found = getattr(found, part, None)
    return found is fn


def rebuild_function(code: types.CodeType, globals_module: str, name: str, qualname: str, module: str,
                     defaults: tuple[Any, ...] | None, kwdefaults: dict[str, Any] | None,
                     closure: tuple[types.CellType, ...] | None, attrs: dict[str, Any]) -> types.FunctionType:
    """A function saved by value by ``saveable_guards`` (unpickling). Saved programs name it: a
    rename or signature change needs a new warm-start format version."""
    fn = types.FunctionType(code, importlib.import_module(globals_module).__dict__, name, defaults, closure)
    fn.__qualname__ = qualname
    fn.__module__ = module
    fn.__kwdefaults__ = kwdefaults
    fn.__dict__.update(attrs)
    return fn


def rebuild_method(func: Callable[..., Any], owner: Any) -> types.MethodType:
    """A method bound in its instance's ``__dict__``, saved by ``saveable_guards`` (unpickling;
    saved programs name it, as ``rebuild_function``)."""
    return types.MethodType(func, owner)


def _shadows(owner: Any, name: str) -> bool:
    """Whether ``owner``'s instance ``__dict__`` holds ``name`` (shadowing its class's attribute)."""
    d = getattr(owner, "__dict__", None)
    return isinstance(d, dict) and name in d


def _by_value(pickler: Any, fn: types.FunctionType) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    tree = pickler.guard_tree_values
    attrs = {k: v for k, v in vars(fn).items() if id(v) in tree}  # what the guards may read; the rest is not saved
    return rebuild_function, (fn.__code__, fn.__globals__.get("__name__", fn.__module__), fn.__name__, fn.__qualname__,
                              fn.__module__, fn.__defaults__, fn.__kwdefaults__, fn.__closure__, attrs)


def _without_grad(pickler: Any, t: torch.Tensor, reduced: Any) -> Any:
    """torch's reduction of ``t`` with its gradient left out, unless a guard reads the gradient
    (torch passes it as the last argument of its tensor rebuild; any other layout is left as is)."""
    grad = t.grad
    if id(grad) in getattr(pickler, "guard_tree_values", ()):
        return reduced
    if (isinstance(reduced, tuple) and len(reduced) == 2 and isinstance(reduced[1], tuple) and reduced[1]
            and reduced[1][-1] is grad):
        return reduced[0], (*reduced[1][:-1], None)
    return reduced


def patched_reducer(original: Callable[..., Any]) -> Callable[..., Any]:
    """torch's ``reducer_override`` with the fixes of the module docstring (installed by
    ``backend/torch_patches.saveable_guards``)."""

    @functools.wraps(original)
    def reducer_override(self: Any, obj: Any) -> Any:
        # torch's reducer_override returns NotImplemented for these (plain pickling by name) unless
        # their id was recorded as missing; skip only that check
        if isinstance(obj, NEVER_MISSING):
            return NotImplemented
        # a function its qualified name does not find (a functools.wraps wrapper): torch saves it as
        # _Missing ("fqn mismatch"); when the guards read it, save it by value instead
        if (isinstance(obj, types.FunctionType) and id(obj) in getattr(self, "guard_tree_values", ())
                and id(obj) not in getattr(self, "missing_values", ()) and "<locals>" not in obj.__qualname__
                and not _found_by_name(obj)):
            return _by_value(self, obj)
        # a method bound in an instance's __dict__ (``module.forward = MethodType(f, module)``) that
        # the guards read: the default reduction, getattr(instance, name), runs while the instance
        # is half restored and finds the CLASS's method; torch catches that only when names differ
        if (isinstance(obj, types.MethodType) and id(obj) in getattr(self, "guard_tree_values", ())
                and id(obj) not in getattr(self, "missing_values", ())
                and _shadows(obj.__self__, obj.__func__.__name__)):
            return rebuild_method, (obj.__func__, obj.__self__)
        reduced = original(self, obj)
        if isinstance(obj, torch.Tensor) and obj.is_leaf and obj.grad is not None:
            return _without_grad(self, obj, reduced)
        return reduced

    reducer_override.__layerpass_saveable_guards__ = True  # type: ignore[attr-defined]
    return reducer_override
