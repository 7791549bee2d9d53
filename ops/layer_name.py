"""``LayerName``: a layer's identity as a hoisted opaque value.

Registered as a hoisted opaque constant type (``layerpass/torch_compat.py`` knows how each torch
spells it), torch.compile lifts every ``LayerName`` reaching a custom op to a graph *input* instead of baking a
string constant into the graph, so N identical layers trace to N identical pieces.

Design choice (torch 2.13): a ``LayerName`` stored as a module attribute is still
guarded by ``__eq__`` (one guard per layer); one constructed inside ``forward`` from
the layer's prefix string is hoisted with no guard. Layers therefore call
``encode_layer_name(self.prefix)`` inside ``forward``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Union

from layerpass.envs import HAS_OPAQUE_TYPE, USE_LAYERNAME
from layerpass.torch_compat import LAYER_NAME_METACLASS, register_layer_name


class LayerName(metaclass=LAYER_NAME_METACLASS):
    """Value-type wrapper of a layer's registered prefix (e.g. ``model.layers.3.self_attn.attn``)."""

    __slots__ = ("value", "__weakref__")  # proxy tracing (make_fx / AOT) keeps weak refs to inputs

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"LayerName takes a str, got {type(value).__name__}: {value!r}")
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LayerName) and self.value == other.value

    def __hash__(self) -> int:
        return hash(("LayerName", self.value))

    def __fx_repr__(self) -> tuple[str, dict[str, type]]:
        return f"LayerName({self.value!r})", {"LayerName": LayerName}

    def __repr__(self) -> str:
        return f"LayerName({self.value!r})"


if HAS_OPAQUE_TYPE:
    register_layer_name(LayerName)

if TYPE_CHECKING:
    LayerNameType = Union[str, LayerName]
else:
    # The annotation of every op's layer-name argument: it decides the op schema.
    LayerNameType = LayerName if USE_LAYERNAME else str


def encode_layer_name(name: str) -> LayerNameType:
    """What a layer passes to an op: a ``LayerName`` when the switch is on, else the str."""
    return LayerName(name) if USE_LAYERNAME else name


def resolve_layer_name(name: LayerName | str) -> str:
    """The plain string behind a layer-name argument, whichever form it has."""
    if isinstance(name, LayerName):
        return name.value
    if isinstance(name, str):
        return name
    raise TypeError(f"expected a LayerName or str layer name, got {type(name).__name__}: {name!r}")
