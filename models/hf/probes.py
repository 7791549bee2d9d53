"""Numeric probes: does a Hugging Face module compute what the layerpass layer replacing it does?

The converter swaps a module only where a probe, run once per module class and conversion on
seeded inputs, shows the same numbers. A module that cannot run the probe's input at all (its
forward wants other arguments or shapes) does not compute the same: that probe answers False.
Those failures are the exceptions a probe names as expected (``CANNOT_RUN``); anything else is a
bug, in layerpass or in the module, and propagates instead of silently keeping the HF module."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import PackedSlice

# torch's shape / dtype errors, a forward that needs other arguments, a module's own input checks
CANNOT_RUN: tuple[type[Exception], ...] = (RuntimeError, TypeError, ValueError)
# the packed probe's too: a forward reading a projection's weight, which its PackedSlice stand-in lacks
PACKED_CANNOT_RUN: tuple[type[Exception], ...] = (*CANNOT_RUN, AttributeError)


class Probes:
    """The probe results of one conversion, each computed once per (probe, module class)."""

    def __init__(self) -> None:
        self._results: dict[tuple[str, type], Any] = {}

    def run(self, name: str, module: nn.Module, probe: Callable[[], Any],
            cannot_run: tuple[type[Exception], ...] = CANNOT_RUN) -> Any:
        """``probe()``'s result for ``module``'s class, or False if it raises one of ``cannot_run``."""
        key = (name, type(module))
        if key not in self._results:
            with torch.no_grad():
                try:
                    self._results[key] = probe()
                except cannot_run:
                    self._results[key] = False
        return self._results[key]


def rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float) -> bool:
    if out.shape != ref.shape or not torch.isfinite(ref).all():
        return False
    scale = float(ref.float().abs().max())
    return float((out.float() - ref.float()).abs().max()) <= tol * max(scale, 1e-30)


def tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2


def probe_input(width: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(width)
    return torch.randn(2, 3, width, generator=g).to(dtype)


def is_silu_mlp(module: nn.Module, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
                dtype: torch.dtype) -> bool:
    """Does ``module(x)`` equal ``down(silu_and_mul([gate(x) | up(x)]))`` (the op layerpass runs)?"""
    x = probe_input(weights[0].shape[1], dtype)
    ref = module(x)
    gate_up = torch.cat([F.linear(x, w, b) for w, b in zip(weights, biases)], dim=-1)
    out = F.linear(torch.ops.layerpass.silu_and_mul(gate_up), module.down_proj.weight, module.down_proj.bias)
    return isinstance(ref, torch.Tensor) and rel_close(out, ref, tolerance(dtype))


def runs_on_packed(module: nn.Module, dtype: torch.dtype) -> bool:
    """Does the module's forward give the same result when handed ``[gate(x) | up(x)]`` and
    slices of it as its projections (it uses ``x`` for nothing else)?"""
    gate, up = module.gate_proj, module.up_proj
    x = probe_input(gate.in_features, dtype)
    ref = module(x)
    packed = torch.cat([gate(x), up(x)], dim=-1)
    inter = gate.out_features
    module.gate_proj, module.up_proj = PackedSlice(0, inter), PackedSlice(inter, inter)
    try:
        out = module(packed)
    finally:
        module.gate_proj, module.up_proj = gate, up
    return isinstance(ref, torch.Tensor) and rel_close(out, ref, 1e-6)


def rms_norm_kind(module: nn.Module, eps: float) -> str | bool:
    """``"rms"`` (``RMSNorm``), ``"gemma"`` (``GemmaRMSNorm``, ``1 + w``), or False: what a float32
    copy of ``module`` computes, on unit-scale inputs and on inputs small enough for eps to matter."""
    probe = copy.deepcopy(module).float()
    d = probe.weight.shape[0]
    g = torch.Generator().manual_seed(d)
    probe.weight.data = torch.randn(d, generator=g)
    x = torch.randn(2, 3, d, generator=g)
    for kind, w in (("rms", probe.weight), ("gemma", 1.0 + probe.weight)):
        if all(rel_close(torch.ops.layerpass.rms_norm(xs, w.detach(), eps), probe(xs), 1e-6) for xs in (x, x * 1e-3)):
            return kind
    return False


def is_scaled_embedding(module: nn.Embedding, scale: torch.Tensor) -> bool:
    """Does ``module(ids)`` equal the plain lookup times ``scale`` (Gemma's scaled embedding)?"""
    ids = torch.randint(0, module.num_embeddings, (2, 5), generator=torch.Generator().manual_seed(0))
    ref = module(ids)
    return torch.equal(F.embedding(ids, module.weight) * scale.to(module.weight.dtype), ref)
