"""Checks on a step's inputs before Dynamo sees them (``layerpass.compile``'s entry).

What a valid step is, and the checks themselves (eager and inside compiled programs), are in
``ops/step_inputs.py``; this module binds a model's call to them and finds the model's position
bound, ``max_position``: the smallest ``RotaryEmbedding.max_position`` (its cos/sin cache length)
and the ``max_position`` of the model's layerpass ``config`` (a Hugging Face conversion's
``max_position_embeddings``). Models with other inputs are not checked.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any

import torch
from torch import nn

from layerpass.ops.step_inputs import check_step_inputs
from layerpass.torch_compat import CONSTANT_OF_MODULE

_STEP_PARAMS = ("input_ids", "positions")
_signatures: dict[Any, inspect.Signature | None] = {}
_rotary_bounds: weakref.WeakKeyDictionary[nn.Module, int | None] = weakref.WeakKeyDictionary()


def max_position(model: nn.Module) -> int | None:
    """The model's position bound (module docstring), or None if it has none. The module walk for
    its rotary embeddings runs once per model; the config is read on every call (it may be set
    after the model is built, as ``from_transformers`` does). While Dynamo traces a forward it is
    run, not traced, and its value is a constant of that trace; torch 2.11 cannot do that with a
    module argument (``torch_compat.CONSTANT_OF_MODULE``), so there the uncached walk is traced."""
    if not CONSTANT_OF_MODULE and torch.compiler.is_compiling():
        return _position_bound(model, _rotary_bound(model))
    return _max_position_constant(model)


@torch.compiler.assume_constant_result
def _max_position_constant(model: nn.Module) -> int | None:
    if model not in _rotary_bounds:
        _rotary_bounds[model] = _rotary_bound(model)
    return _position_bound(model, _rotary_bounds[model])


def _rotary_bound(model: nn.Module) -> int | None:
    from layerpass.layers import RotaryEmbedding

    lengths = [m.max_position for m in model.modules() if isinstance(m, RotaryEmbedding)]
    return min(lengths) if lengths else None


def _position_bound(model: nn.Module, rotary: int | None) -> int | None:
    """The smaller of the rotary bound and the config's ``max_position`` (written for Dynamo to
    trace on 2.11: no ``min(..., default=)``)."""
    bounds = [b for b in (rotary, getattr(getattr(model, "config", None), "max_position", None))
              if isinstance(b, int) and not isinstance(b, bool)]
    return min(bounds) if bounds else None


def _signature(model: nn.Module) -> inspect.Signature | None:
    """The model's forward signature if it takes ``input_ids`` and ``positions`` (cached per class)."""
    key = type(model)
    if key not in _signatures:
        try:
            sig = inspect.signature(model.forward)
        except (TypeError, ValueError):
            sig = None
        _signatures[key] = sig if sig is not None and all(p in sig.parameters for p in _STEP_PARAMS) else None
    return _signatures[key]


def check_model_inputs(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                       where: str = "layerpass compiled model") -> None:
    """Check ``model(*args, **kwargs)``'s step inputs (a no-op for a model with other inputs).

    Arguments that do not bind to the forward are left to the call itself to report."""
    sig = _signature(model)
    if sig is None:
        return
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return
    if all(p in bound.arguments for p in _STEP_PARAMS):
        check_step_inputs(bound.arguments["input_ids"], bound.arguments["positions"], where, max_position(model))
