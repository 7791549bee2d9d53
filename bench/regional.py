"""The ``regional`` bench mode: ``torch.compiler.nested_compile_region`` on the decoder layer.

PyTorch's native answer to "compile a repeated layer once": mark the layer's ``forward`` as a
nested compile region, then ``torch.compile`` the whole model with Inductor. The marking is
done on a per-model subclass of the layer class (one wrapped function shared by every layer,
so Dynamo can reuse the region), leaving the original class and other models untouched.
"""

from __future__ import annotations

import torch
from torch import nn

_SUBCLASSES: dict[type, type] = {}


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's largest ``ModuleList`` whose children all share one class (the decoder layers)."""
    best: nn.ModuleList | None = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best)):
                best = module
    if best is None:
        raise ValueError(
            f"regional: {type(model).__name__} has no nn.ModuleList of same-class layers to mark as a "
            "nested compile region"
        )
    return best


def _regional_class(cls: type) -> type:
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        sub = type(f"Regional{cls.__name__}", (cls,), {
            "forward": torch.compiler.nested_compile_region(cls.forward),
            "__doc__": f"{cls.__name__} whose forward is a torch.compiler.nested_compile_region.",
        })
        _SUBCLASSES[cls] = sub
    return sub


def apply_nested_compile_region(model: nn.Module) -> int:
    """Mark every decoder layer's forward as a nested compile region; returns how many layers."""
    layers = find_decoder_layers(model)
    for layer in layers:
        layer.__class__ = _regional_class(type(layer))
    return len(layers)
