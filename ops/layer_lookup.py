"""How an op finds its layer: its layer-name argument, resolved in the step's registry.

The step's registry comes from the forward context (``set_forward_context``); outside one, the
registry layers are being constructed into (``current_registry``)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from torch import nn

from .forward_context import current_forward_context
from .layer_name import LayerName, resolve_layer_name
from .state import LayerNotFoundError, current_registry

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
    if not isinstance(name, (str, LayerName)) or _PATTERN_EXAMPLES.get():
        return None
    ctx = current_forward_context()
    registry = ctx.registry if ctx is not None and ctx.registry is not None else current_registry()
    try:
        return registry.get(name)
    except KeyError:
        return None
