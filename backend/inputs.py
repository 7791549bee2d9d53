"""Checks on a step's inputs before Dynamo sees them.

A model whose ``forward`` takes ``input_ids`` and ``positions`` (every zoo model, the Hugging
Face conversions) is called with one flat batch of tokens:

- ``input_ids``: a 1-D integer tensor ``[num_tokens]`` (int32 or int64; not bool);
- ``positions``: a 1-D integer tensor of the same length, on the same device;
- ``num_tokens >= 1``: a 0-token batch is an error (``ValueError``), not an empty result; there
  is nothing to run, so the caller should skip the step. (Compiled, it would otherwise fail on an
  unbacked-size guard, ``Ne(u0, 0)``; eager, on a reshape.)

Anything else raises ``ValueError`` naming the argument, what it got and what is allowed, instead
of a fake-tensor error or a failed guard from inside Dynamo. Only shapes, dtypes and devices are
read: no tensor value, so no device sync. Models with other inputs are not checked.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

_INT_DTYPES = (torch.int32, torch.int64)
_STEP_PARAMS = ("input_ids", "positions")
_signatures: dict[Any, inspect.Signature | None] = {}


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dim()}-D {str(x.dtype).replace('torch.', '')} tensor of shape {list(x.shape)} on {x.device}"
    return f"a {type(x).__name__}"


def check_step_inputs(input_ids: Any, positions: Any, where: str = "model forward") -> None:
    """``ValueError`` unless ``input_ids`` and ``positions`` are one valid step's (module docstring)."""
    for name, x in (("input_ids", input_ids), ("positions", positions)):
        if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.dtype not in _INT_DTYPES:
            raise ValueError(f"{where}: {name} must be a 1-D integer tensor [num_tokens] (int32 or int64), got "
                             f"{_describe(x)}" + ("; flatten a [batch, seq] batch into one token dimension"
                                                  if isinstance(x, torch.Tensor) and x.dim() == 2 else ""))
    if positions.shape[0] != input_ids.shape[0]:
        raise ValueError(f"{where}: positions must have one entry per token, like input_ids: input_ids has "
                         f"{input_ids.shape[0]} tokens, positions {positions.shape[0]}")
    if positions.device != input_ids.device:
        raise ValueError(f"{where}: input_ids and positions must be on one device, got {input_ids.device} and "
                         f"{positions.device}")
    if input_ids.shape[0] == 0:
        raise ValueError(f"{where}: a 0-token batch (input_ids of shape [0]); a step needs at least one token: "
                         f"skip the call when there is nothing to run")


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
        check_step_inputs(bound.arguments["input_ids"], bound.arguments["positions"], where)
