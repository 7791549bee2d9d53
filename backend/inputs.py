"""Checks on a step's inputs before Dynamo sees them.

A model whose ``forward`` takes ``input_ids`` and ``positions`` (every zoo model, the Hugging
Face conversions) is called with one flat batch of tokens:

- ``input_ids``: a 1-D integer tensor ``[num_tokens]`` (int32 or int64; not bool);
- ``positions``: a 1-D integer tensor of the same length, on the same device;
- ``num_tokens >= 1``: a 0-token batch is an error (``ValueError``), not an empty result; there
  is nothing to run, so the caller should skip the step. (Compiled, it would otherwise fail on an
  unbacked-size guard, ``Ne(u0, 0)``; eager, on a reshape.)

- every position in ``[0, max_position)``, the model's bound (``max_position``): the smallest
  ``RotaryEmbedding.max_position`` (its cos/sin cache length) and the ``max_position`` of the
  model's layerpass ``config`` (a Hugging Face conversion's ``max_position_embeddings``). Values
  are read only for CPU tensors, where it is free; on any other device reading them would be a
  device sync per step, so they are not checked there (an out-of-range position then fails inside
  the kernel, compiled on CUDA as a device-side assert). (Compiled on CPU it would otherwise abort
  the process on an Inductor bounds assert; eager, an ``IndexError``.)

Anything else raises ``ValueError`` naming the argument, what it got and what is allowed, instead
of a fake-tensor error or a failed guard from inside Dynamo. Apart from CPU positions, only shapes,
dtypes and devices are read. Models with other inputs are not checked.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any

import torch
from torch import nn

_INT_DTYPES = (torch.int32, torch.int64)
_STEP_PARAMS = ("input_ids", "positions")
_signatures: dict[Any, inspect.Signature | None] = {}
_rotary_bounds: weakref.WeakKeyDictionary[nn.Module, int | None] = weakref.WeakKeyDictionary()


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dim()}-D {str(x.dtype).replace('torch.', '')} tensor of shape {list(x.shape)} on {x.device}"
    return f"a {type(x).__name__}"


def max_position(model: nn.Module) -> int | None:
    """The model's position bound (module docstring), or None if it has none. The module walk for
    its rotary embeddings runs once per model; the config is read on every call (it may be set
    after the model is built, as ``from_transformers`` does)."""
    if model not in _rotary_bounds:
        from layerpass.layers import RotaryEmbedding

        _rotary_bounds[model] = min((m.max_position for m in model.modules() if isinstance(m, RotaryEmbedding)),
                                    default=None)
    bounds = [_rotary_bounds[model], getattr(getattr(model, "config", None), "max_position", None)]
    return min((b for b in bounds if isinstance(b, int) and not isinstance(b, bool)), default=None)


def check_step_inputs(input_ids: Any, positions: Any, where: str = "model forward",
                      max_position: int | None = None) -> None:
    """``ValueError`` unless ``input_ids`` and ``positions`` are one valid step's (module docstring);
    ``max_position``: positions must be below it (checked on CPU only; None: no bound)."""
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
    if max_position is not None and positions.device.type == "cpu":
        lo, hi = (int(v) for v in torch.aminmax(positions))
        if lo < 0 or hi >= max_position:
            raise ValueError(f"{where}: positions must be in [0, {max_position}) (the model's max_position), got "
                             f"positions from {lo} to {hi}")


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
