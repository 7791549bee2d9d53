"""Checks on a step's inputs before Dynamo sees them (``layerpass.compile``'s entry).

What a valid step is, the checks themselves (eager and inside compiled programs) and the model's
position bound (``max_position``) are in ``ops/step_inputs.py``; this module binds a model's call
to them. Models with other inputs are not checked.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from layerpass.ops.step_inputs import check_step_inputs, max_position

_STEP_PARAMS = ("input_ids", "positions")
_signatures: dict[Any, inspect.Signature | None] = {}


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
