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


def build_case(model_name: str, layers: int) -> tuple[Any, Any]:
    """(model, step): the zoo model with ``layers`` decoder layers and the fixed step for it."""
    from layerpass.models import build_model, make_step

    model = build_model(model_name, num_layers=layers)
    return model, make_step(model, num_decodes=NUM_DECODES, prefill_lens=list(PREFILL_LENS))


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
