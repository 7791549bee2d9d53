"""Per-layer state by name: layers register under their unique prefix, ops look them up.

A ``LayerRegistry`` is scoped to one model: ``build_model`` (or any caller) opens a
``layer_registry_scope()`` while constructing, every layer built inside registers
there, and the forward context of a step names the registry its ops resolve against.
Two models in one process therefore never collide. Outside any scope, layers go to a
process-wide default registry.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import weakref
from collections.abc import Iterator

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


NO_CONTEXT_HINT = (
    "no forward context is set (the layer registry and batch metadata of a step come from it): run the model "
    "inside `with set_forward_context(metadata, model.layer_registry):` (layerpass.ops), or use "
    "`layerpass.models.make_step(model, ...).run(model)`; "
)


def lookup_layer(name: LayerName | str, needs: tuple[str, ...] = (), op: str = "") -> nn.Module:
    """Resolve an op's layer-name argument to its layer: the step's registry first.

    ``needs``: attributes the op reads from the layer (its kind); a layer without one is a
    ``ValueError`` naming ``op``, the layer, its type and the missing attribute (e.g. ``moe_forward``
    given an attention layer's name). Plain attribute checks: no tensor is read."""
    from .forward_context import current_forward_context

    ctx = current_forward_context()
    if ctx is not None and ctx.registry is not None:
        layer = ctx.registry.get(name)
    else:
        registry = current_registry()
        key = resolve_layer_name(name)
        if key not in registry:  # most likely the step's context was never set
            raise LayerNotFoundError(key, registry, note=NO_CONTEXT_HINT if ctx is None else (
                "the forward context names no layer registry (set_forward_context(metadata, registry)); "))
        layer = registry.get(key)
    missing = [a for a in needs if getattr(layer, a, None) is None]
    if missing:
        raise ValueError(f"{op or 'op'}: layer {resolve_layer_name(name)!r} is a {type(layer).__name__}, which has no "
                         f"{missing[0]!r}; {op or 'this op'} needs a layer with {', '.join(needs)} (is it the name of "
                         f"another kind of layer?)")
    return layer


# Set while a pass traces a fusion pattern on example inputs (``tracing_pattern_examples``): their
# shapes are placeholders, not any layer's, so layer-dependent checks must not compare them.
_PATTERN_EXAMPLES: contextvars.ContextVar[bool] = contextvars.ContextVar("layerpass_pattern_examples", default=False)


@contextlib.contextmanager
def tracing_pattern_examples() -> Iterator[None]:
    """``find_layer`` finds no layer in this block (a pattern is traced on example inputs: with
    ``VLLM_USE_LAYERNAME=0`` its body is bound to a real layer's name, not to its shapes)."""
    token = _PATTERN_EXAMPLES.set(True)
    try:
        yield
    finally:
        _PATTERN_EXAMPLES.reset(token)


def find_layer(name: object) -> nn.Module | None:
    """The layer ``name`` resolves to now (as ``lookup_layer``), or ``None``: not a layer name (a
    fake script object while tracing), or no such layer (a pattern's example name, no forward
    context). For argument checks that can use the layer when it is known (eager entry points,
    fake kernels at trace time); the kernels resolve with ``lookup_layer``, which raises."""
    from .forward_context import current_forward_context

    if not isinstance(name, (str, LayerName)) or _PATTERN_EXAMPLES.get():
        return None
    ctx = current_forward_context()
    registry = ctx.registry if ctx is not None and ctx.registry is not None else current_registry()
    try:
        return registry.get(name)
    except KeyError:
        return None
