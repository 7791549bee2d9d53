"""What ``layerpass.compile`` did with a model's decoder layers, read from its ``CompileReport``.

The regions path (the default) traces each distinct decoder layer once; the doctor's question is
whether that happened, and if not why: the report's ``trace`` says which path ran ("regions",
"whole-model", or an eager step before going whole-model) and its notes why (no repeated layers,
a layer with a graph break, training mode, ...). When it did, the layers are grouped by the
compiled pieces their region programs run (one group, one set of artifacts), each with its layer
class and how its pieces were obtained; layers whose pieces are equal except for constants (a
layer name passed as a ``str`` gives every layer a region and a compile of its own) are findings,
as in the whole-model analysis. Fusions are the report's totals over all layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .findings import Finding, PieceRecord, find_avoidable
from ..report.compile_report import CompileReport
from ..regions.router import find_repeated_layers


@dataclass
class LayerGroup:
    """Decoder layers whose region programs run the same compiled pieces."""

    layer_class: str
    layers: list[int]
    keys: tuple[str, ...]  # the compiled pieces' keys, in program order
    source: str  # how the first layer's pieces were obtained: "compiled", "cache", ...
    eager_pieces: int = 0  # splitting ops run between the pieces (split="ops")


@dataclass
class RegionsDiagnosis:
    trace: str  # the report's: "regions", "whole-model", "eager (this step; ...)"
    num_regions: int
    warm_start: str
    groups: list[LayerGroup]
    findings: list[Finding]
    matches: dict[str, int] = field(default_factory=dict)  # fusions over all layers
    notes: list[str] = field(default_factory=list)  # the report's: why not regions, what changed

    @property
    def ok(self) -> bool:
        """Every layer ran as a region, and no two layers compile apart only for their constants."""
        return self.trace == "regions" and not self.findings

    def format(self, max_findings: int = 5) -> str:
        if self.trace != "regions":
            lines = [f"PROBLEM: layerpass.compile: the decoder layers did not run as regions (trace: {self.trace})"]
            lines += [f"  - {n}" for n in self.notes] or ["  (the report gives no reason)"]
            return "\n".join(lines)
        num_layers = sum(len(g.layers) for g in self.groups)
        lines = [f"layerpass.compile: {num_layers} decoder layers in {self.num_regions} region(s), "
                 f"{len(self.groups)} distinct compiled program(s); warm start: {self.warm_start}"]
        for g in self.groups:
            eager = f" + {g.eager_pieces} eager" if g.eager_pieces else ""
            lines.append(f"  {g.layer_class} layers {_ranges(g.layers)}: {len(g.keys)} piece(s){eager} "
                         f"[{', '.join(k[:8] for k in g.keys)}] ({g.source})")
        fused = ", ".join(f"{name} {n}" for name, n in self.matches.items() if n)
        lines.append(f"  fusions over all layers: {fused or 'none'}")
        lines += [f"  note: {n}" for n in self.notes]
        if self.findings:
            lines.append(f"PROBLEM: {len(self.findings)} region program(s) compiled only for their constants:")
            lines += [f"  - {f.message()}" for f in self.findings[:max_findings]]
            if len(self.findings) > max_findings:
                lines.append(f"  ... and {len(self.findings) - max_findings} more")
        return "\n".join(lines)


def read_regions_report(report: CompileReport, model: nn.Module) -> RegionsDiagnosis:
    """The diagnosis of one ``layerpass.compile`` call's report on ``model``."""
    layers = find_repeated_layers(model) if report.trace == "regions" else []
    per_layer: dict[int, list] = {}
    for p in report.pieces:
        if p.layer is not None:
            per_layer.setdefault(p.layer, []).append(p)
    groups: dict[tuple[str, tuple[str, ...]], LayerGroup] = {}
    for index in sorted(per_layer):
        pieces = per_layer[index]
        keys = tuple(p.key for p in pieces if p.kind == "compiled" and p.key is not None)
        cls = type(layers[index]).__name__ if index < len(layers) else "?"
        group = groups.get((cls, keys))
        if group is None:
            source = next((p.source for p in pieces if p.kind == "compiled"), "eager")
            group = groups[(cls, keys)] = LayerGroup(cls, [], keys, source, sum(p.kind == "eager" for p in pieces))
        group.layers.append(index)
    records = [PieceRecord(f"layer {p.layer}", p.layer, p.key, p.shape_key or p.key, list(p.constants))
               for p in report.pieces if p.kind == "compiled" and p.key is not None and p.layer is not None]
    return RegionsDiagnosis(report.trace, report.num_regions, report.warm_start, list(groups.values()),
                            find_avoidable(records, model), dict(report.matches), list(report.notes))


def _ranges(indices: list[int]) -> str:
    """``0, 2-5, 7`` for ``[0, 2, 3, 4, 5, 7]``."""
    out: list[str] = []
    start = prev = indices[0]
    for i in [*indices[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(out)
