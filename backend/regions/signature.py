"""Structure signatures of modules: what the region match and the warm-start key hash.

One walk over a module tree (classes, parameter/buffer metadata, Python attributes) serves both:

- ``layer_signature``: whether a region may serve a layer. Scalars and strings count by type only,
  because Dynamo's saved guards check the values a trace reads (or take them as inputs); what saved
  guards drop is object identity, so callables, classes and other objects are named here.
- the warm-start model key (``backend/regions/warm_start.py``): every attribute by value, strings included
  (when in doubt, key on more).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from layerpass.fingerprint import class_source


def describe(value: Any, *, values: bool) -> Any:
    """A Python attribute for hashing; ``values=False`` keeps only the type of scalars and strings."""
    if isinstance(value, (str, bool, int, float, complex)) or value is None:
        return (type(value).__name__, value) if values else type(value).__name__
    if isinstance(value, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return str(value)
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), tuple(value.shape), value.device.type)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(describe(v, values=values) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((repr(k), describe(v, values=values))
                              for k, v in sorted(value.items(), key=lambda kv: repr(kv[0]))))
    if callable(value):
        return ("callable", getattr(value, "__module__", None), getattr(value, "__qualname__", type(value).__qualname__))
    return ("object", type(value).__module__, type(value).__qualname__)


# Attributes that hold a module's position in its tensor-parallel group (by the layers' naming
# convention): every rank has its own value, so their values stay out of the model key and the
# ranks of a group share saved programs. A trace that reads one is still correct on every rank:
# Dynamo guards on the value it read (a layer-rooted guard layerpass checks on each call), so
# another rank's layer fails the guard and is traced for itself.
RANK_LOCAL_ATTRIBUTES = frozenset({"tp_rank", "vocab_start_index", "vocab_end_index"})


def module_lines(root: nn.Module, *, values: bool) -> Iterator[str]:
    """One line per submodule, parameter/buffer and public attribute of ``root``'s tree (the
    values of ``RANK_LOCAL_ATTRIBUTES`` as their type only)."""
    for path, module in root.named_modules():
        cls = type(module)
        yield f"{path}|{cls.__module__}.{cls.__qualname__}|{module.training}"
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            yield f"{name}|{t.dtype}|{tuple(t.shape)}|{t.device.type}|{t.requires_grad}"
        for name, value in sorted(vars(module).items()):
            if not name.startswith("_") and name != "training":
                yield f"{name}={describe(value, values=values and name not in RANK_LOCAL_ATTRIBUTES)!r}"


def layer_signature(layer: nn.Module) -> str:
    """Structure of a layer that a region traced from another layer must share to serve it."""
    h = hashlib.sha256()
    for line in module_lines(layer, values=False):
        h.update(line.encode())
    return h.hexdigest()[:32]


def class_key(cls: type) -> str:
    """Names a layer class in the program store: its qualified name and its source."""
    return hashlib.sha256(f"{cls.__module__}.{cls.__qualname__}\n{class_source(cls)}".encode()).hexdigest()[:24]
