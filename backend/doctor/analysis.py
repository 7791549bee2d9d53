"""The doctor: why does a compiled model compile more than it should?

Two analyses of one model on one example:

- The whole model (``torch.compile`` with the layerpass backend, split per layer): pieces equal
  except for constants, which compile apart though one artifact would serve them all
  (``backend/doctor/findings.py``: which constants, the op each one feeds, how to fix it).
- ``layerpass.compile`` (the default path; ``compile=True`` only, it runs Inductor): whether the
  decoder layers ran as regions, and if not why (a graph break, no repeated layers, ...); per group
  of layers the layer class, the region program's pieces and how they were obtained; the fusions;
  region programs compiled apart only for their constants (``backend/doctor/regions_report.py``).

``diagnose(model, example)`` works on any model: ``example`` is either the positional inputs
or a callable that runs a given function on them inside whatever context the model needs
(for zoo models, ``make_step(...).run``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from layerpass import envs

from ..compiled_model import compile as layerpass_compile
from .findings import Finding, PieceRecord, find_avoidable
from .regions_report import RegionsDiagnosis, read_regions_report

Example = Sequence[Any] | Callable[[Callable[..., Any]], Any]


@dataclass
class DoctorReport:
    pieces: list[PieceRecord]
    findings: list[Finding]
    compiled: bool  # True: through the real backend (Inductor ran); False: analysis only
    use_layername: bool
    regions: RegionsDiagnosis | None = None  # what layerpass.compile did (compile=True only)

    @property
    def num_unique(self) -> int:
        return len({p.key for p in self.pieces})

    @property
    def num_structures(self) -> int:
        return len({p.shape_key for p in self.pieces})

    @property
    def avoidable(self) -> int:
        """Compiles that exist only because of differing constants."""
        return self.num_unique - self.num_structures

    @property
    def ok(self) -> bool:
        return self.avoidable == 0 and (self.regions is None or self.regions.ok)

    def format(self, max_findings: int = 5) -> str:
        lines = [
            f"layerpass doctor: {len(self.pieces)} compiled pieces, {self.num_unique} unique, "
            f"{self.num_structures} distinct structures "
            f"({'compiled through the backend' if self.compiled else 'analysis only, no Inductor'}; "
            f"VLLM_USE_LAYERNAME switch {'on' if self.use_layername else 'off'})"
        ]
        if self.avoidable == 0:
            lines.append("OK: every piece that shares a structure shares one compiled artifact.")
        else:
            lines.append(f"PROBLEM: {self.avoidable} avoidable compile(s): pieces equal except for constants.")
            for f in self.findings[:max_findings]:
                lines.append(f"  - {f.message()}")
            if len(self.findings) > max_findings:
                lines.append(f"  ... and {len(self.findings) - max_findings} more such piece(s)")
        if self.regions is not None:
            lines.append(self.regions.format(max_findings))
        return "\n".join(lines)


class _AnalysisBackend:
    """A Dynamo backend that splits and hashes exactly as the layerpass backend does, then runs eagerly."""

    def __init__(self, split: str, splitting_ops: tuple[str, ...]) -> None:
        self.split = split
        self.splitting_ops = splitting_ops
        self.graphs: list[list[PieceRecord]] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        from layerpass.backend.pieces.compiler import walk_pieces
        from layerpass.backend.pieces.piece_hash import piece_signature
        from layerpass.backend.pieces.split import split_graph

        result = split_graph(gm, self.split, self.splitting_ops)
        records: list[PieceRecord] = []

        def record(target: str, sub: fx.GraphModule, node: fx.Node, args: tuple[Any, ...]) -> None:
            if target not in result.eager_pieces:
                sig = piece_signature(sub, args)
                records.append(PieceRecord(target, result.piece_layers.get(target), sig.key, sig.shape_key,
                                           list(sig.constants)))

        walk_pieces(result.graph_module, example_inputs, record)
        self.graphs.append(records)
        return gm.forward


def _mark_dynamic(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark the token dims as ``layerpass.compile`` does, so the pieces hash identically."""
    from layerpass.backend.pieces.compiler import mark_token_dims, own_aliases

    def call(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = own_aliases(args, kwargs)  # marked, never the caller's tensors
        mark_token_dims([*args, *kwargs.values()])
        return fn(*args, **kwargs)

    return call


def _run_example(example: Example, fn: Callable[..., Any]) -> None:
    with torch.no_grad():
        if callable(example):
            example(fn)
        elif isinstance(example, (tuple, list)):
            fn(*example)
        else:
            raise TypeError(
                f"doctor: example must be the model's positional inputs (tuple/list) or a callable that runs a "
                f"given function on them (e.g. Step.run); got {type(example).__name__}"
            )


def _prefixed(graphs: list[list[PieceRecord]]) -> list[PieceRecord]:
    if len(graphs) == 1:
        return graphs[0]
    out = []
    for g, records in enumerate(graphs):
        for r in records:
            out.append(PieceRecord(f"graph{g}.{r.name}", r.layer, r.key, r.shape_key, r.constants))
    return out


def _regions(model: nn.Module, example: Example, config: Any) -> RegionsDiagnosis:
    """Run ``example`` through ``layerpass.compile(model, config)`` and read what it did: the report
    of a call that left regions if there is one (that is the problem to show), else the first's."""
    from layerpass.backend.report.compile_report import compile_reports, num_compile_reports

    mark = num_compile_reports()
    _run_example(example, layerpass_compile(model, config))
    reports = compile_reports(since=mark)
    if not reports:
        raise RuntimeError("doctor: layerpass.compile published no report for the example")
    report = next((r for r in reports if r.trace != "regions"), reports[0])
    return read_regions_report(report, model)


def diagnose(model: nn.Module, example: Example, *, compile: bool = True, config: Any = None) -> DoctorReport:
    """Compile ``model`` on ``example``; explain pieces that are equal except for constants and,
    with ``compile=True``, what ``layerpass.compile`` did with the decoder layers.

    - ``example``: the positional inputs, or ``run(fn)`` that calls ``fn`` on them (``Step.run``).
    - ``compile=True`` goes through the real backend on the whole model (Inductor per unique piece,
      cache disabled), then through ``layerpass.compile`` (regions); ``compile=False`` splits and
      hashes the whole model identically but runs eagerly (seconds, not minutes), and skips regions.
    - ``config``: a ``CompilationConfig`` (its ``split`` decides the pieces).

    Calls ``torch.compiler.reset()`` first, so the model is traced afresh even if it was compiled
    before (other compiled functions of the process recompile on their next call)."""
    from layerpass.backend.config import CompilationConfig
    from layerpass.backend.report.compile_report import compile_reports, num_compile_reports

    if not isinstance(model, nn.Module):
        raise TypeError(f"doctor: model must be a torch.nn.Module, got {type(model).__name__}")
    if config is None:
        config = CompilationConfig(cache_dir=tempfile.mkdtemp(prefix="layerpass-doctor-"), disable_cache=True)
    elif not isinstance(config, CompilationConfig):
        raise TypeError(f"doctor: config must be a layerpass CompilationConfig, got {type(config).__name__}")
    torch.compiler.reset()  # a model compiled before in this process must be traced again
    if compile:
        from layerpass.backend.pieces.compiler import LayerpassBackend

        # the whole model through the real backend, as the analysis below sees it (not per region)
        mark = num_compile_reports()
        compiled = torch.compile(model, backend=LayerpassBackend(config))
        _run_example(example, _mark_dynamic(compiled) if config.dynamic_tokens else compiled)
        graphs = []
        for report in compile_reports(since=mark):
            graphs.append([PieceRecord(p.name, p.layer, p.key, p.shape_key or p.key, list(p.constants))
                           for p in report.pieces if p.kind == "compiled" and p.key is not None])
    else:
        backend = _AnalysisBackend(config.split, config.splitting_ops)
        _run_example(example, _mark_dynamic(torch.compile(model, backend=backend)) if config.dynamic_tokens
                     else torch.compile(model, backend=backend))
        graphs = backend.graphs
    if not graphs:
        raise RuntimeError("doctor: the example never reached the compiler (no graph was captured)")
    pieces = _prefixed(graphs)
    regions = _regions(model, example, config) if compile else None
    return DoctorReport(pieces, find_avoidable(pieces, model), compile, envs.USE_LAYERNAME, regions)
