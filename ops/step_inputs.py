"""Checks on one step's token inputs, ``input_ids`` and ``positions``, on every path.

A model whose ``forward`` takes ``input_ids`` and ``positions`` (every zoo model, the Hugging
Face conversions) is called with one flat batch of tokens:

- ``input_ids``: a 1-D integer tensor ``[num_tokens]`` (int32 or int64; not bool);
- ``positions``: a 1-D integer tensor of the same length, on the same device;
- ``num_tokens >= 1``: a 0-token batch is an error (``ValueError``), not an empty result; there
  is nothing to run, so the caller should skip the step.
- every position in ``[0, max_position)``, the model's bound (``max_position(model)``: the smallest
  ``max_position`` of its ``PositionBounded`` modules, a rotary embedding's cos/sin cache length,
  and of its layerpass ``config``, a Hugging Face conversion's ``max_position_embeddings``). Values are read only for CPU
  tensors, where it is free; on any other device reading them would be a device sync per step,
  so the bound is checked on the step's host metadata instead (``BatchMetadata.host``: a
  request's positions run up to ``seq_len - 1``), when a forward context holds one.

Anything else raises ``ValueError`` naming the argument, what it got and what is allowed.

``check_step_inputs`` runs in eager, and also while Dynamo traces a model's forward (any
backend, ``torch.compile(model, backend="layerpass")`` included): there what the trace knows
(ranks, dtypes, devices, sizes that are not symbolic) is checked at trace time, and the op
``layerpass::check_step_inputs``, recorded in the graph, checks the real tensors each time the
compiled program runs. The model goes on with the op's output (a copy of ``input_ids``), so
no dead-code elimination drops the check. A bad input the trace already sees (a 0-token batch of
static size, a 2-D tensor) is raised by a call Dynamo leaves out of the graph: raising while
tracing would make Dynamo run the forward eagerly from then on.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from layerpass.torch_compat import CONSTANT_OF_MODULE

from .library import layerpass_op

_INT_DTYPES = (torch.int32, torch.int64)


class PositionBounded:
    """A module whose ``max_position`` bounds the positions a step may use (a rotary embedding's
    cos/sin cache has that many rows). The layer declares it by deriving from this class, so the
    step checks here and the compiled model's entry check (``backend/inputs.py``) need no layer class."""

    max_position: int


_module_bounds: weakref.WeakKeyDictionary[nn.Module, int | None] = weakref.WeakKeyDictionary()


def max_position(model: nn.Module) -> int | None:
    """The model's position bound: the smallest ``max_position`` of its ``PositionBounded`` modules
    and of its layerpass ``config``; None if it has none. The module walk runs once per model; the
    config is read on every call (it may be set after the model is built, as ``from_transformers``
    does). While Dynamo traces a forward it is run, not traced, and its value is a constant of that
    trace; torch 2.11 cannot do that with a module argument (``torch_compat.CONSTANT_OF_MODULE``),
    so there the uncached walk is traced."""
    if not CONSTANT_OF_MODULE and torch.compiler.is_compiling():
        return _position_bound(model, _module_bound(model))
    return _max_position_constant(model)


@torch.compiler.assume_constant_result
def _max_position_constant(model: nn.Module) -> int | None:
    if model not in _module_bounds:
        _module_bounds[model] = _module_bound(model)
    return _position_bound(model, _module_bounds[model])


def _module_bound(model: nn.Module) -> int | None:
    lengths = [m.max_position for m in model.modules() if isinstance(m, PositionBounded)]
    return min(lengths) if lengths else None


def _position_bound(model: nn.Module, modules_bound: int | None) -> int | None:
    """The smaller of the modules' bound and the config's ``max_position`` (written for Dynamo to
    trace on 2.11: no ``min(..., default=)``)."""
    bounds = [b for b in (modules_bound, getattr(getattr(model, "config", None), "max_position", None))
              if isinstance(b, int) and not isinstance(b, bool)]
    return min(bounds) if bounds else None


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dim()}-D {str(x.dtype).replace('torch.', '')} tensor of shape {list(x.shape)} on {x.device}"
    return f"a {type(x).__name__}"


def _on_host(t: torch.Tensor) -> bool:
    """Whether ``t``'s values may be read: a CPU tensor, where that costs nothing."""
    return t.device.type == "cpu"


def _static_problem(input_ids: Any, positions: Any, where: str) -> str | None:
    """What is wrong that is known without values, or None; symbolic sizes are compared without a
    guard (an unbacked token count passes here; the op sees the real size)."""
    from torch.fx.experimental.symbolic_shapes import guard_or_false

    for name, x in (("input_ids", input_ids), ("positions", positions)):
        if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.dtype not in _INT_DTYPES:
            return (f"{where}: {name} must be a 1-D integer tensor [num_tokens] (int32 or int64), got "
                    f"{_describe(x)}" + ("; flatten a [batch, seq] batch into one token dimension"
                                         if isinstance(x, torch.Tensor) and x.dim() == 2 else ""))
    if guard_or_false(positions.shape[0] != input_ids.shape[0]):
        return (f"{where}: positions must have one entry per token, like input_ids: input_ids has "
                f"{input_ids.shape[0]} tokens, positions {positions.shape[0]}")
    if positions.device != input_ids.device:
        return f"{where}: input_ids and positions must be on one device, got {input_ids.device} and {positions.device}"
    if guard_or_false(input_ids.shape[0] == 0):
        return (f"{where}: a 0-token batch (input_ids of shape [0]); a step needs at least one token: skip the "
                f"call when there is nothing to run")
    return None


@torch.compiler.disable
def _raise_at_run_time(message: str) -> None:
    """Raise ``ValueError(message)`` when the program runs: while tracing, a call Dynamo does not
    trace (a graph break; only for an input the trace already knows is bad). An exception raised
    at trace time instead would make Dynamo run the forward eagerly from then on."""
    raise ValueError(message)


def _check_position_values(positions: torch.Tensor, where: str, max_position: int) -> None:
    if _on_host(positions):
        lo, hi = (int(v) for v in torch.aminmax(positions))
        if lo < 0 or hi >= max_position:
            raise ValueError(f"{where}: positions must be in [0, {max_position}) (the model's max_position), got "
                             f"positions from {lo} to {hi}")
        return
    from .batch_metadata import host_values
    from .forward_context import current_forward_context

    ctx = current_forward_context()
    h = None if ctx is None or ctx.metadata is None else host_values(ctx.metadata)
    longest = max(h.seq_lens, default=0) if h is not None else 0
    if longest > max_position:
        raise ValueError(f"{where}: positions must be in [0, {max_position}) (the model's max_position), but the "
                         f"batch's longest sequence has {longest} tokens (BatchMetadata.seq_lens), so its last "
                         f"position is {longest - 1}")


def _check_all(input_ids: Any, positions: Any, where: str, max_position: int | None) -> None:
    problem = _static_problem(input_ids, positions, where)
    if problem is not None:
        raise ValueError(problem)
    if max_position is not None:
        _check_position_values(positions, where, max_position)


def _fake_checked(input_ids, positions, where, max_position=None):
    return input_ids.new_empty(input_ids.shape)


@layerpass_op("check_step_inputs", fake=_fake_checked)
def checked_input_ids(input_ids: torch.Tensor, positions: torch.Tensor, where: str,
                      max_position: int | None = None) -> torch.Tensor:
    """The run-time half of ``check_step_inputs`` inside a compiled program, on the real tensors;
    returns a copy of ``input_ids`` (an op's output may not alias its input) for the model to use,
    so no dead-code elimination can drop the check (one copy of ``num_tokens`` ints per step)."""
    _check_all(input_ids, positions, where, max_position)
    return input_ids.clone()


def check_step_inputs(input_ids: Any, positions: Any, where: str = "model forward",
                      max_position: int | None = None) -> Any:
    """``ValueError`` unless ``input_ids`` and ``positions`` are one valid step's (module docstring);
    ``max_position``: positions must be below it (None: no bound). Returns ``input_ids``: the model
    must go on with the returned tensor, which while tracing is the op's output (so the checks the
    trace cannot decide run each time the compiled program does)."""
    if not torch.compiler.is_compiling():
        _check_all(input_ids, positions, where, max_position)
        return input_ids
    problem = _static_problem(input_ids, positions, where)
    if problem is not None:
        _raise_at_run_time(problem)
    return torch.ops.layerpass.check_step_inputs(input_ids, positions, where, max_position)
