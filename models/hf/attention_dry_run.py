"""The conversion's attention dry run: one token through the model, to see what each HF
attention module passes the attention function (head counts, head sizes, ``scaling``,
``sliding_window``, ``softcap``, sinks), before it gets a layerpass ``Attention``.

The model runs with the ``"layerpass_probe"`` attention implementation (``probe_attention``),
which records every call into the ``AttentionRecorder`` of the conversion running the dry run
and returns zeros: only the calls matter."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from layerpass.ops import LayerRegistry, set_forward_context

PROBE_IMPLEMENTATION = "layerpass_probe"
OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "dense")  # an attention module's output projection, by family


@dataclass
class AttentionCall:
    """What one HF attention module passed to the attention function in the dry run."""

    module: nn.Module
    num_heads: int
    num_kv_heads: int
    head_size: int
    value_head_size: int
    kwargs: dict[str, Any] = field(default_factory=dict)


class AttentionRecorder:
    """The attention calls of one conversion's dry run (``calls``, in call order)."""

    def __init__(self) -> None:
        self.calls: list[AttentionCall] = []

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[AttentionCall]]:
        """``probe_attention`` records into this recorder inside the block (one dry run at a time)."""
        if _RECORDER.get() is not None:
            raise RuntimeError("from_transformers' attention dry run is not re-entrant")
        token = _RECORDER.set(self)
        try:
            yield self.calls
        finally:
            _RECORDER.reset(token)


# The recorder of the dry run in progress: transformers calls the attention function with the HF
# module and tensors only, so this is how the call finds the conversion it belongs to.
_RECORDER: contextvars.ContextVar[AttentionRecorder | None] = contextvars.ContextVar(
    "layerpass_attention_recorder", default=None)


def probe_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Record the call (shapes and feature kwargs) and return zeros: only the calls matter."""
    recorder = _RECORDER.get()
    if recorder is None:
        raise RuntimeError(f"attention implementation {PROBE_IMPLEMENTATION!r} only runs inside from_transformers' dry run")
    recorder.calls.append(AttentionCall(module, query.shape[1], key.shape[1], query.shape[-1], value.shape[-1],
                                        dict(kwargs)))
    return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None


def record_attention_calls(model: nn.Module, hf_model: nn.Module, registry: LayerRegistry,
                           paths: dict[int, str]) -> list[AttentionCall]:
    """Run ``model`` (the converted ``hf_model``) on one token with the probe implementation and
    return the attention calls. ``paths``: the HF modules' paths, to name the module that fails."""
    hf_model.set_attn_implementation(PROBE_IMPLEMENTATION)
    zero = torch.zeros(1, dtype=torch.long)
    with AttentionRecorder().recording() as calls, torch.no_grad(), set_forward_context(None, registry):
        try:
            model(zero, zero)
        except RuntimeError as e:  # a shape error: say which module and why, where we can
            error = output_width_error(calls[-1], paths.get(id(calls[-1].module)), hf_model.config) if calls else None
            if error is not None:
                raise error from e
            raise
    return calls


def output_width_error(call: AttentionCall, path: str | None, hf_config: Any) -> ValueError | None:
    """The clear error for an attention module whose output projection does not take what the
    attention returns (heads * head_dim features): the dry run fails on it with a shape error, and
    so would the Hugging Face model (Helium builds ``o_proj`` as hidden_size -> hidden_size)."""
    width = call.num_heads * call.value_head_size
    for name in OUTPUT_PROJECTIONS:
        proj = call.module._modules.get(name)
        takes = {getattr(proj, a, None) for a in ("in_features", "input_size", "input_size_per_partition")} - {None}
        if takes and width not in takes:
            c = getattr(hf_config, "get_text_config", lambda: hf_config)()
            return ValueError(
                f"from_transformers: {path or type(call.module).__name__!r} ({type(call.module).__name__}) returns "
                f"{call.num_heads} heads x head_dim {call.value_head_size} = {width} attention features, but its {name} "
                f"takes {max(takes)} (config: head_dim={getattr(c, 'head_dim', None)}, num_attention_heads="
                f"{getattr(c, 'num_attention_heads', None)}, hidden_size={getattr(c, 'hidden_size', None)}); the "
                f"Hugging Face model cannot run this config either: use a head_dim with num_attention_heads * head_dim "
                f"= {max(takes)}")
    return None
