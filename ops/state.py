"""Per-layer state by name: layers register under their unique prefix, ops look them up.

A ``LayerRegistry`` is scoped to one model: ``build_model`` (or any caller) opens a
``layer_registry_scope()`` while constructing, every layer built inside registers
there, and the forward context of a step names the registry its ops resolve against.
Two models in one process therefore never collide. Outside any scope, layers go to a
process-wide default registry. (An op resolves its layer-name argument through the step's
registry with ``layer_lookup.lookup_layer``.)
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from .layer_name import LayerName, resolve_layer_name


class LayerNotFoundError(KeyError):
    """An op was given a layer name that no layer registered."""

    def __init__(self, name: str, registry: "LayerRegistry", note: str = "") -> None:
        close = difflib.get_close_matches(name, list(registry.names()), n=5, cutoff=0.5)
        hint = f"closest registered names: {close}" if close else (
            f"{len(registry)} layers registered" + (f", e.g. {sorted(registry.names())[:3]}" if len(registry) else "")
        )
        self.name = name
        self.closest = close
        super().__init__(f"{note}no layer registered as {name!r} in registry {registry.label!r}; {hint}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class DuplicateLayerError(ValueError):
    """Two layers were registered under the same prefix in one registry."""


class LayerRegistry:
    """Maps a layer prefix to the live layer module (weakly: a dropped model frees its names)."""

    def __init__(self, label: str = "model") -> None:
        self.label = label
        self._layers: "weakref.WeakValueDictionary[str, nn.Module]" = weakref.WeakValueDictionary()
        self.version = 0  # bumped by register / unregister (a dropped layer leaves silently: see len())
        # layers_with_tensor's answer, keyed by (version, len, attrs): the batch check asks every step
        self._tensor_holders: tuple[tuple, list[tuple[str, weakref.ref]]] | None = None

    def register(self, prefix: str, layer: nn.Module) -> None:
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"a layer prefix must be a non-empty str, got {prefix!r}")
        existing = self._layers.get(prefix)
        if existing is not None and existing is not layer:
            raise DuplicateLayerError(
                f"layer prefix {prefix!r} is already registered in registry {self.label!r} "
                f"(by a {type(existing).__name__}); every layer needs a unique prefix"
            )
        self._layers[prefix] = layer
        self.version += 1

    def unregister(self, prefix: str) -> None:
        self._layers.pop(prefix, None)
        self.version += 1

    def get(self, name: LayerName | str) -> nn.Module:
        key = resolve_layer_name(name)
        layer = self._layers.get(key)
        if layer is None:
            raise LayerNotFoundError(key, self)
        return layer

    def layers_with_tensor(self, attrs: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
        """``(name, layer)``, by name, of the live layers holding a tensor in one of ``attrs``. Which
        layers is remembered until the registry changes; the tensors are the layers' own, read now."""
        key = (self.version, len(self), attrs)
        if self._tensor_holders is None or self._tensor_holders[0] != key:
            holders = []
            for name in sorted(self.names()):
                layer = self._layers.get(name)  # None: dropped meanwhile
                if layer is not None and any(isinstance(getattr(layer, a, None), torch.Tensor) for a in attrs):
                    holders.append((name, weakref.ref(layer)))
            self._tensor_holders = (key, holders)
        return [(name, layer) for name, ref in self._tensor_holders[1] if (layer := ref()) is not None]

    def names(self) -> Iterator[str]:
        return iter(list(self._layers.keys()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, (str, LayerName)) and resolve_layer_name(name) in self._layers

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        return f"LayerRegistry({self.label!r}, {len(self)} layers)"


DEFAULT_REGISTRY = LayerRegistry("default")
_construction_registry: contextvars.ContextVar[LayerRegistry | None] = contextvars.ContextVar(
    "layerpass_construction_registry", default=None
)


@contextlib.contextmanager
def layer_registry_scope(registry: LayerRegistry | None = None) -> Iterator[LayerRegistry]:
    """Layers constructed inside register into ``registry`` (a new one if not given)."""
    registry = registry if registry is not None else LayerRegistry()
    token = _construction_registry.set(registry)
    try:
        yield registry
    finally:
        _construction_registry.reset(token)


def current_registry() -> LayerRegistry:
    """The registry layers constructed now register into."""
    registry = _construction_registry.get()
    return DEFAULT_REGISTRY if registry is None else registry
