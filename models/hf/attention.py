"""The ``"layerpass"`` attention implementation for Hugging Face models, and the attention
modules of a converted model.

A converted model keeps every HF attention module and ITS OWN forward (projections, q/k norms,
rotary, whatever the family does); only the attention itself changes: the module calls the
function registered as ``"layerpass"`` with transformers' ``AttentionInterface``,
``layerpass_attention_forward(module, query [1, H, T, D], key, value, mask, *, scaling, ...)``,
which runs the module's layerpass ``Attention`` (``module.attn``). Its op,
``unified_attention_with_output``, writes the paged KV cache and masks per request from the
step's batch metadata (looked up by ``LayerName``), so the HF mask is not used (it is not even
built: transformers builds none for an attention function without a mask function).

The per-layer features the module passes (``scaling``, ``sliding_window``, ``softcap``, sinks as
``s_aux``) are read ONCE, at conversion, by a one-token dry run through
``"layerpass_probe"`` (``attention_dry_run.py``), and given to the layer's ``Attention``: they are
layer attributes its op reads by name, so layers that differ only in them share a compiled
piece. In eager mode every call checks that the module still passes what the layer was built
with.

``TransformersAttention`` wraps an HF attention module whose q/k/v projections are three linears:
one ``QKVParallelLinear`` computes them, and the HF module's ``q_proj``/``k_proj``/``v_proj``
become ``PackedSlice`` views of that output (the HF forward receives the packed projections as its
``hidden_states``). Registration is lazy and idempotent: importing layerpass does not import
transformers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from layerpass.layers import Attention, ColumnParallelLinear, tensor_model_parallel_all_gather

from .attention_dry_run import PROBE_IMPLEMENTATION, probe_attention

ATTN_IMPLEMENTATION = "layerpass"


def _feature(attn: Attention, name: str, default: Any = None) -> Any:
    return getattr(attn, name, default)


def check_attention_call(attn: Attention, scaling: float | None, dropout: float, sliding_window: int | None,
                         softcap: float | None, s_aux: torch.Tensor | None) -> None:
    """The module must pass what its layer was built with (eager runs only: under torch.compile
    reading these per-layer attributes would add one Dynamo guard per layer)."""
    where = attn.prefix
    if dropout:
        raise ValueError(f"{where}: attention dropout {dropout} is not supported (inference only)")
    if scaling is not None and float(scaling) != attn.scale:
        raise ValueError(f"{where}: the module passes scaling {scaling}, the layer was built with {attn.scale}")
    if (sliding_window or None) != _feature(attn, "sliding_window"):
        raise ValueError(f"{where}: the module passes sliding_window={sliding_window}, the layer was built with "
                         f"{_feature(attn, 'sliding_window')}")
    if (softcap or None) != _feature(attn, "logits_soft_cap"):
        raise ValueError(f"{where}: the module passes softcap={softcap}, the layer was built with "
                         f"{_feature(attn, 'logits_soft_cap')}")
    has_sinks = _feature(attn, "sinks") is not None
    if (s_aux is not None) != has_sinks:
        raise ValueError(f"{where}: the module {'passes' if s_aux is not None else 'does not pass'} attention sinks "
                         f"(s_aux), the layer was built {'with' if has_sinks else 'without'} them")


def layerpass_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                attention_mask: torch.Tensor | None, scaling: float | None = None,
                                dropout: float = 0.0, sliding_window: int | None = None, softcap: float | None = None,
                                s_aux: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """HF layout in (``[1, H, T, D]``), HF layout out (``[1, T, Hq, D]``, no attention weights)."""
    attn = getattr(module, "attn", None)
    if not isinstance(attn, Attention):
        raise TypeError(
            f"attention implementation {ATTN_IMPLEMENTATION!r} runs on a layerpass Attention at `module.attn`; "
            f"{type(module).__name__} has none: convert the model with layerpass.models.from_transformers"
        )
    if not torch.compiler.is_compiling():
        check_attention_call(attn, scaling, dropout, sliding_window, softcap, s_aux)
        if query.dim() != 4 or query.shape[0] != 1:
            raise ValueError(f"{attn.prefix}: expected query [1, heads, tokens, head_size] (one flattened batch), "
                             f"got {tuple(query.shape)}")
    t = query.shape[2]
    q, k, v = (token_rows(x, t) for x in (query, key, value))
    out = attn(q, k, v)
    return out.view(1, t, attn.num_heads, attn.head_size), None


def token_rows(x: torch.Tensor, tokens: int | torch.SymInt) -> torch.Tensor:
    """``[1, H, T, D]`` -> ``[T, H * D]``, the flat per-token rows the layer's op takes, always a
    fresh tensor (explicit sizes, no -1: the token count may be an unbacked symbol).

    A fresh tensor, not a view, also for one head (MQA, or one KV head per tensor-parallel rank):
    a view of HF's ``[1, 1, T, D]`` (the rotary output) is ambiguous to Inductor, which reads it
    as channels-last and then needs a hint for the unbacked token count to order its strides
    (``GuardOnDataDependentSymNode``). Under Inductor the copy is the rotary kernel's own output;
    for more than one head ``reshape`` copied anyway."""
    rows = x[0].transpose(0, 1).clone(memory_format=torch.contiguous_format)
    return rows.view(tokens, x.shape[1] * x.shape[3])


def register_attention_function() -> None:
    """Register ``"layerpass"`` (and the dry run's ``"layerpass_probe"``) with transformers'
    ``AttentionInterface`` (idempotent)."""
    from transformers import AttentionInterface

    for name, fn in ((ATTN_IMPLEMENTATION, layerpass_attention_forward), (PROBE_IMPLEMENTATION, probe_attention)):
        if AttentionInterface._global_mapping.get(name) is not fn:
            AttentionInterface.register(name, fn)


# -- packed q/k/v -------------------------------------------------------------------------------
class PackedSlice(nn.Module):
    """``packed[..., start : start + size]``: one projection's part of a packed projection's output
    (this rank's part; ``gather=True`` all-gathers it, for a projection whose tensor-parallel plan
    replicates its output)."""

    def __init__(self, start: int, size: int, gather: bool = False) -> None:
        super().__init__()
        self.start, self.size, self.gather = start, size, gather

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        out = packed.narrow(-1, self.start, self.size)
        return tensor_model_parallel_all_gather(out, dim=-1) if self.gather else out

    def extra_repr(self) -> str:
        return f"[{self.start}:{self.start + self.size}]" + (", gathered" if self.gather else "")


def packed_slices(layer: ColumnParallelLinear, gather: bool) -> list[PackedSlice]:
    """One ``PackedSlice`` per packed output of ``layer``, in order."""
    out, start = [], 0
    for size in layer.output_sizes_per_partition:
        out.append(PackedSlice(start, size, gather and layer.tp_size > 1))
        start += size
    return out


class GatheredPacked(nn.Module):
    """A packed column-parallel layer whose output the model needs whole on every rank: each packed
    slice is gathered on its own (gathering the packed output would interleave the shards)."""

    def __init__(self, layer: ColumnParallelLinear) -> None:
        super().__init__()
        self.layer = layer
        self.slices = nn.ModuleList(packed_slices(layer, gather=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        return torch.cat([s(y) for s in self.slices], dim=-1)


class ReadsThrough(nn.Module):
    """A module wrapping an HF module (its submodule named ``INNER``): attributes the wrapper does
    not have are read through to the HF module."""

    INNER = ""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get(type(self).INNER)
            if inner is None or name.startswith("__"):  # half-built (copy, unpickling) or a dunder
                raise
            return getattr(inner, name)


class TransformersAttention(ReadsThrough):
    """An HF attention module (``hf_attn``, run by its own forward) whose q/k/v come from ONE packed
    ``qkv_proj``: ``hf_attn.q_proj``/``k_proj``/``v_proj`` are ``PackedSlice``s, and the HF forward
    receives the packed projections in place of ``hidden_states`` (an HF attention forward uses
    ``hidden_states`` only as the projections' input and for its leading shape). Same call
    signature and return as the HF module; other attributes are read through to it."""

    INNER = "hf_attn"

    def __init__(self, qkv_proj: ColumnParallelLinear, hf_attn: nn.Module) -> None:
        super().__init__()
        self.qkv_proj = qkv_proj
        self.hf_attn = hf_attn

    @property
    def attn(self) -> Attention:
        return self.hf_attn.attn

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.hf_attn(self.qkv_proj(hidden_states), *args, **kwargs)
