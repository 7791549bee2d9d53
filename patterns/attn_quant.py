"""Attention + static FP8 output quant -> attention writing FP8 (``output_scale=scale``).

Unfused: ``auto_functionalized(attention, output=buf, output_scale=None)`` -> reshape ->
``static_scaled_fp8_quant``. Fused: one attention call whose output buffer is fp8.

Version-conditional closures: with ``USE_LAYERNAME`` the layer name is a pattern input
(``layer_name=None`` here), so ONE registration matches every layer; without it the name
is a ``str`` constant in the graph and each layer needs its own pattern (pass its name).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized

from .common import ATTN, QUANT, aten, empty_fp8


def attn_quant_pattern(layer_name: str | None) -> tuple[Callable, Callable]:
    if layer_name is None:

        def pattern(q, k, v, output, scale, layer_name):
            at = auto_functionalized(ATTN, query=q, key=k, value=v, output=output, layer_name=layer_name, output_scale=None)
            flat = aten.reshape.default(at[1], [q.shape[0], q.shape[1] * q.shape[2]])
            quant = auto_functionalized(QUANT, result=empty_fp8(flat), input=flat, scale=scale)
            return quant[1]

        def replacement(q, k, v, output, scale, layer_name):
            at = auto_functionalized(ATTN, query=q, key=k, value=v, output=empty_fp8(output), layer_name=layer_name, output_scale=scale)
            return aten.reshape.default(at[1], [q.shape[0], q.shape[1] * q.shape[2]])

        return pattern, replacement

    def pattern_const(q, k, v, output, scale):
        at = auto_functionalized(ATTN, query=q, key=k, value=v, output=output, layer_name=layer_name, output_scale=None)
        flat = aten.reshape.default(at[1], [q.shape[0], q.shape[1] * q.shape[2]])
        quant = auto_functionalized(QUANT, result=empty_fp8(flat), input=flat, scale=scale)
        return quant[1]

    def replacement_const(q, k, v, output, scale):
        at = auto_functionalized(ATTN, query=q, key=k, value=v, output=empty_fp8(output), layer_name=layer_name, output_scale=scale)
        return aten.reshape.default(at[1], [q.shape[0], q.shape[1] * q.shape[2]])

    return pattern_const, replacement_const


def attn_quant_example_inputs(with_layer_name: object | None) -> list:
    """Small fake-mode examples (shapes are wildcards in the registered pattern)."""
    q = torch.empty(5, 4, 16)
    kv = torch.empty(5, 2, 16)
    args = [q, kv, kv.clone(), torch.empty(5, 4, 16), torch.empty(1)]
    return args + ([with_layer_name] if with_layer_name is not None else [])
