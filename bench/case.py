"""The case every benchmark child measures: a zoo model and one fixed decode-first step.

The step is 2 decode requests (random history) then prefills of 3 and 5 tokens, the same in every
benchmark so their figures compare. ``first_compiled_call`` is the cold-compile measurement the
switch benchmarks (``compile_time``, ``fusion_stats``) share.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

NUM_DECODES = 2
PREFILL_LENS = (3, 5)


def build_case(model_name: str, layers: int, *, device: str = "cpu", dtype: Any = None,
               num_decodes: int = NUM_DECODES, prefill_lens: tuple[int, ...] = PREFILL_LENS) -> tuple[Any, Any]:
    """(model, step): the zoo model with ``layers`` decoder layers and the fixed step for it, in
    ``dtype`` (default: the model's) on ``device`` (the step's history is prefilled on CPU first)."""
    from layerpass.models import build_model, make_step

    model = build_model(model_name, num_layers=layers, **({} if dtype is None else {"dtype": dtype}))
    step = make_step(model, num_decodes=num_decodes, prefill_lens=list(prefill_lens))
    if device != "cpu":
        to_device(model, step, device)
    return model, step


def to_device(model: Any, step: Any, device: str) -> None:
    """Move a zoo model (parameters, buffers and the plain tensor attributes ops read: KV caches,
    rotary tables, FP8 scales) and its step (inputs, batch metadata) to ``device``, in place."""
    import torch

    from layerpass.models.step import STATE_ATTR
    from layerpass.ops import build_batch_metadata

    for module in model.modules():
        if isinstance(getattr(module, STATE_ATTR, None), torch.Tensor):
            raise ValueError(f"{type(module).__name__} keeps recurrent state ({STATE_ATTR}); the step's state snapshot "
                             f"stays on CPU, so a model with recurrent layers runs on CPU only here")
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor):
                setattr(module, name, value.to(device))
    model.to(device)
    requests = step.requests
    step.input_ids, step.positions = step.input_ids.to(device), step.positions.to(device)
    step.metadata = build_batch_metadata([len(r.tokens) for r in requests], [len(r.history) for r in requests],
                                         [r.blocks for r in requests], model.cache_config.block_size,
                                         state_indices=[r.state_slot for r in requests], device=device)


@dataclass
class FirstCall:
    compiled: Any  # what layerpass.compile returned
    first_call_s: float  # the first compiled step (regions trace and compile inside it)
    max_abs_err: float  # against the eager step


def first_compiled_call(model_name: str, layers: int, config: Any) -> FirstCall:
    """``layerpass.compile`` the case with ``config`` in this process and time its first step."""
    import torch

    import layerpass

    model, step = build_case(model_name, layers)
    with torch.no_grad():
        ref = step.run(model)
        compiled = layerpass.compile(model, config)
        t0 = time.perf_counter()
        out = step.run(compiled)
        first = time.perf_counter() - t0
    return FirstCall(compiled, first, float((out - ref).abs().max()))
