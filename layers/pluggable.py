"""``PluggableLayer``: layers a hardware back end can replace out of tree, without monkeypatching.

Two registries:

- in tree: ``@PluggableLayer.register("qkv_parallel_linear")`` names a layer class;
- out of tree: ``@QKVParallelLinear.register_oot`` (or ``@PluggableLayer.register_oot(name=...)``)
  registers a subclass that replaces it.

Constructing an in-tree layer whose name has an OOT replacement returns an instance of the
OOT class (``__new__`` picks the class, so ``__init__`` runs once, the OOT one). Only the
class registered under the name is redirected: a registered subclass with its own name
(``ParallelLMHead`` under ``VocabParallelEmbedding``) keeps its own entry.

There is no ``forward_native``/``forward_cuda`` dispatch: every layer defines ``forward``, and a
class without one anywhere in its in-tree hierarchy is refused when it registers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from layerpass.ops import current_registry

L = TypeVar("L", bound=type)

_IN_TREE: dict[str, type["PluggableLayer"]] = {}
_OOT: dict[str, type["PluggableLayer"]] = {}
_NAME_ATTR = "_pluggable_name"  # read from the class's own __dict__ only (never inherited)


def _own_name(cls: type) -> str | None:
    return cls.__dict__.get(_NAME_ATTR)


def _defines_forward(cls: type) -> bool:
    """Whether ``cls`` or an in-tree base between it and ``PluggableLayer`` defines ``forward``."""
    for klass in cls.__mro__:
        if klass is PluggableLayer or klass is nn.Module:
            return False
        if "forward" in klass.__dict__:
            return True
    return False


class PluggableLayer(nn.Module):
    """Base of every layerpass layer: a ``prefix`` registered in the current layer registry."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "PluggableLayer":
        # nn.Module.__new__ is object.__new__: it takes no constructor arguments.
        return super().__new__(maybe_get_oot_by_class(cls))

    def __init__(self, prefix: str) -> None:
        super().__init__()
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"{type(self).__name__} needs a non-empty str prefix, got {prefix!r}")
        self.prefix = prefix
        # Ops resolve the layer by this name (see ops/state.py).
        current_registry().register(prefix, self)

    # -- in-tree registry ---------------------------------------------------------------------
    @staticmethod
    def register(name: str) -> Callable[[L], L]:
        """Class decorator: register an in-tree layer class under ``name`` (unique)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"PluggableLayer.register needs a non-empty str name, got {name!r}")

        def decorate(cls: L) -> L:
            if not (isinstance(cls, type) and issubclass(cls, PluggableLayer)):
                raise TypeError(f"@PluggableLayer.register({name!r}) decorates PluggableLayer subclasses, got {cls!r}")
            if name in _IN_TREE:
                raise ValueError(
                    f"layer name {name!r} is already registered in tree by {_IN_TREE[name].__qualname__}; "
                    f"cannot register {cls.__qualname__} under it"
                )
            if _own_name(cls) is not None:
                raise ValueError(f"{cls.__qualname__} is already registered in tree as {_own_name(cls)!r}")
            if not _defines_forward(cls):
                raise TypeError(
                    f"{cls.__qualname__} (registering as {name!r}) defines no forward() in its in-tree hierarchy; "
                    f"PluggableLayer has no forward_native/forward_cuda dispatch, every layer defines forward"
                )
            setattr(cls, _NAME_ATTR, name)
            _IN_TREE[name] = cls
            return cls

        return decorate

    # -- out-of-tree registry -----------------------------------------------------------------
    @classmethod
    def register_oot(
        cls, oot_cls: type | None = None, *, name: str | None = None, replace: bool = False
    ) -> Any:
        """Register ``oot_cls`` as the replacement of in-tree layer ``name`` (default: ``cls``'s name).

        Usable as ``@X.register_oot``, ``@X.register_oot(name=...)`` or
        ``@PluggableLayer.register_oot(name=...)``. ``replace=True`` overrides a previous OOT class."""

        def decorate(klass: type) -> type:
            target = name if name is not None else _own_name(cls)
            if target is None:
                raise ValueError(
                    f"register_oot on {cls.__qualname__}: it is not an in-tree layer, pass name=...; "
                    f"known layers: {sorted(_IN_TREE)}"
                )
            in_tree = _IN_TREE.get(target)
            if in_tree is None:
                raise KeyError(f"no in-tree layer named {target!r}; known layers: {sorted(_IN_TREE)}")
            if not isinstance(klass, type) or not issubclass(klass, in_tree) or klass is in_tree:
                raise TypeError(
                    f"out-of-tree layer {getattr(klass, '__qualname__', klass)!r} must be a subclass of the in-tree "
                    f"layer it replaces, {in_tree.__qualname__} ({target!r})"
                )
            if _own_name(klass) is not None:
                raise TypeError(
                    f"{klass.__qualname__} is itself an in-tree layer ({_own_name(klass)!r}); it cannot replace {target!r}"
                )
            current = _OOT.get(target)
            if current is not None and current is not klass and not replace:
                raise ValueError(
                    f"in-tree layer {target!r} ({in_tree.__qualname__}) already has an out-of-tree replacement "
                    f"{current.__qualname__}; pass replace=True to override it with {klass.__qualname__}"
                )
            _OOT[target] = klass
            return klass

        return decorate if oot_cls is None else decorate(oot_cls)

    @classmethod
    def unregister_oot(cls, name: str | None = None) -> type | None:
        """Drop the OOT replacement of ``name`` (default: ``cls``'s name); returns it (or None)."""
        target = name if name is not None else _own_name(cls)
        if target is None or target not in _IN_TREE:
            raise KeyError(f"no in-tree layer named {target!r}; known layers: {sorted(_IN_TREE)}")
        return _OOT.pop(target, None)


def maybe_get_oot_by_class(cls: type) -> type:
    """The OOT class registered for in-tree class ``cls``, or ``cls`` itself."""
    name = _own_name(cls)
    return _OOT.get(name, cls) if name is not None else cls


def in_tree_layers() -> dict[str, type]:
    """Snapshot of the in-tree registry (name -> class)."""
    return dict(_IN_TREE)


def oot_layers() -> dict[str, type]:
    """Snapshot of the out-of-tree registry (in-tree name -> replacement class)."""
    return dict(_OOT)


def unregister_in_tree(name: str) -> None:
    """Remove an in-tree registration (tests registering throwaway classes clean up with this)."""
    cls = _IN_TREE.pop(name, None)
    _OOT.pop(name, None)
    if cls is not None and _NAME_ATTR in cls.__dict__:
        delattr(cls, _NAME_ATTR)
