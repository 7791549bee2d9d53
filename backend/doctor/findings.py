"""Pieces equal except for constants: the doctor's findings (no compiling here).

The backend compiles one artifact per distinct piece key. Two pieces whose structure is identical
(equal ``shape_key``) but whose key differs are different *only* because of constants baked into
the graph, typically a layer's name passed to an op as a ``str``: every layer then costs its own
Inductor compile, though one would serve all of them. ``find_avoidable`` groups pieces by
``shape_key`` and, per extra compile, names the constants that differ, the op each one feeds and
how to fix it. Structural differences (prologue, epilogue, layer 0 without a residual) are
expected and never findings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from layerpass import envs
from layerpass.ops.library import op_name


@dataclass
class PieceRecord:
    """One compiled piece as the doctor sees it."""

    name: str
    layer: int | None
    key: str
    shape_key: str
    constants: list[tuple[str, str, Any]] = field(default_factory=list)  # (node, op target, str value)


@dataclass
class ConstantDiff:
    op: str  # the op the constant is an argument of, e.g. "layerpass.moe_forward"
    value_a: Any
    value_b: Any
    is_layer_name: bool


@dataclass
class Finding:
    """Two pieces with one structure that still compile separately."""

    piece_a: str
    piece_b: str
    diffs: list[ConstantDiff]
    advice: str

    def message(self) -> str:
        if not self.diffs:
            return (f"pieces {self.piece_a} and {self.piece_b} have one structure but differ in non-str "
                    f"constants (opaque objects or other values baked into the graph): {self.advice}")
        parts = []
        for d in self.diffs:
            parts.append(f"the {type(d.value_b).__name__} constant {d.value_b!r} (vs {d.value_a!r}) passed to {d.op}")
        what = parts[0] if len(parts) == 1 else "; ".join(parts)
        return f"pieces {self.piece_a} and {self.piece_b} differ only in {what}: {self.advice}"


def op_label(target: str) -> str:
    """A readable op name (``op_name``): ``layerpass.moe_forward`` for ``layerpass.moe_forward.default``
    or ``torch._ops.layerpass.<module noise>.moe_forward``; a non-default overload is kept."""
    name = op_name(target, overload=True) or target
    return name[: -len(".default")] if name.endswith(".default") else name


def _layer_names(model: nn.Module) -> set[str]:
    names = {n for n, _ in model.named_modules() if n}
    registry = getattr(model, "layer_registry", None)
    if registry is not None:
        names.update(registry.names())
    return names


def _advice(diffs: list[ConstantDiff]) -> str:
    if not diffs:
        return "make these values identical across layers or pass them as inputs"
    if any(d.is_layer_name for d in diffs):
        if not envs.HAS_OPAQUE_TYPE:
            return (f"this torch ({torch.__version__}) has no hoisted opaque types, so layer names stay str "
                    "constants; torch>=2.11 shares one compile across layers")
        if not envs.USE_LAYERNAME:
            return "VLLM_USE_LAYERNAME is off, so layer names are str constants: turn it on (unset it or set 1)"
        return ("pass a LayerName instead (layerpass.ops.encode_layer_name(prefix) inside forward, "
                "the op's argument typed LayerNameType)")
    return "this str is baked into the graph: pass it as an input or make it the same in every layer"


def _diff(a: PieceRecord, b: PieceRecord, layer_names: set[str]) -> list[ConstantDiff]:
    if len(a.constants) == len(b.constants):
        pairs = zip(a.constants, b.constants)
        return [ConstantDiff(op_label(cb[1]), ca[2], cb[2], cb[2] in layer_names or ca[2] in layer_names)
                for ca, cb in pairs if ca[2] != cb[2] or ca[1] != cb[1]]
    # Equal structure implies equal constant positions; be robust anyway.
    va = {(c[1], c[2]) for c in a.constants}
    return [ConstantDiff(op_label(t), None, v, v in layer_names) for t, v in ((c[1], c[2]) for c in b.constants)
            if (t, v) not in va]


def find_avoidable(pieces: Sequence[PieceRecord], model: nn.Module | None = None) -> list[Finding]:
    """One finding per piece whose key differs from the first piece of its structure group."""
    names = _layer_names(model) if model is not None else set()
    groups: dict[str, list[PieceRecord]] = {}
    for p in pieces:
        groups.setdefault(p.shape_key, []).append(p)
    findings = []
    for group in groups.values():
        first = group[0]
        seen = {first.key}
        for p in group[1:]:
            if p.key in seen:
                continue
            seen.add(p.key)
            diffs = _diff(first, p, names)
            findings.append(Finding(first.name, p.name, diffs, _advice(diffs)))
    return findings
