"""Fill a cache without serving: ``layerpass precompile MODEL --layers N``.

A serving step is what decides which region programs a model needs: a step of several tokens
traces the token-dynamic region of each distinct layer, a one-token decode step the one
specialised to a single token. ``precompile`` runs both kinds (``SERVING_STEPS``) through
``layerpass.compile``, so every process started on the cache afterwards (another rank, a replica,
another machine through the remote store or a bundle) loads instead of tracing or compiling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from layerpass.backend.compiled_model import CompiledModel
from layerpass.backend.compiled_model import compile as layerpass_compile
from layerpass.backend.config import CompilationConfig
from layerpass.backend.report.compile_report import CompileReport, compile_reports, num_compile_reports
from layerpass.backend.regions.warm_start import ProgramStore
from layerpass.models import build_model, make_step

# (num_decodes, prefill_lens): a mixed decode-first step, and a single-token decode step
SERVING_STEPS: tuple[tuple[int, tuple[int, ...]], ...] = ((2, (5, 3)), (1, ()))


@dataclass
class Precompiled:
    """What a precompile (or any first launch on a cache) did, summed over its steps."""

    model: nn.Module
    compiled: CompiledModel
    reports: list[CompileReport] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    references: list[torch.Tensor] = field(default_factory=list)

    def sources(self) -> dict[str, int]:
        """Distinct pieces by how they were obtained (compiled / loaded / waited), over all steps."""
        totals = {"compiled": 0, "loaded": 0, "waited": 0}
        for r in self.reports:
            for k, n in r.piece_sources().items():
                totals[k] += n
        return totals

    def summary(self) -> dict[str, Any]:
        first = self.reports[0] if self.reports else CompileReport()
        regions = [] if self.compiled.regions is None else self.compiled.regions.regions
        return {"pieces": self.sources(), "warm_start": first.warm_start, "trace": first.trace,
                "regions_traced": sum(r.source != "loaded" for r in regions),
                "regions_loaded": sum(r.source == "loaded" for r in regions),
                "dynamo_s": sum(r.dynamo_s for r in self.reports), "regions": first.num_regions,
                "max_abs_err": max(((o - r).abs().max().item() for o, r in zip(self.outputs, self.references)),
                                   default=None)}


def run_serving_steps(model_name: str, num_layers: int, config: CompilationConfig, *, seed: int = 0,
                      reference: bool = False, overrides: dict[str, Any] | None = None) -> Precompiled:
    """Build zoo model ``model_name`` (or ``hf-config:PATH``; ``overrides``: config fields, as
    ``build_model`` takes them), compile it with ``layerpass.compile`` and run ``SERVING_STEPS``
    through it; with ``reference`` also eagerly, to compare."""
    model = build_model(model_name, num_layers=num_layers, seed=seed, **(overrides or {}))
    result = Precompiled(model, layerpass_compile(model, config))
    for i, (decodes, prefills) in enumerate(SERVING_STEPS):
        step = make_step(model, num_decodes=decodes, prefill_lens=list(prefills), seed=seed + 1 + i)
        mark = num_compile_reports()
        with torch.no_grad():
            if reference:
                result.references.append(step.run(model))
            result.outputs.append(step.run(result.compiled))
        result.reports.extend(compile_reports(since=mark))
    return result


def program_store(model_name: str, num_layers: int, config: CompilationConfig, *, seed: int = 0,
                  overrides: dict[str, Any] | None = None) -> ProgramStore:
    """The saved-program store of a model as ``layerpass.compile`` keys it (for ``cache export``)."""
    model = build_model(model_name, num_layers=num_layers, seed=seed, **(overrides or {}))
    compiled = layerpass_compile(model, config)
    return ProgramStore(compiled.backend.location, model, compiled.backend.key_parts())
