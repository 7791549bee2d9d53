"""The uniqueness doctor: why are pieces of a compiled model not shared?

The backend compiles one artifact per distinct piece hash. Two pieces whose structure is
identical (equal ``shape_key``) but whose full hash differs are different *only* because of
constants baked into the graph, typically a layer's name passed to an op as a ``str``: every
layer then costs its own Inductor compile, though one would serve all of them. The doctor
groups pieces by ``shape_key``, prints the constants that differ and the op each one feeds,
and says how to fix it. Structural differences (prologue, epilogue, layer 0 without a
residual) are expected and not reported as problems.

``diagnose(model, example)`` works on any model: ``example`` is either the positional inputs
or a callable that runs a given function on them inside whatever context the model needs
(for zoo models, ``make_step(...).run``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

import layerpass
from layerpass.ops.library import op_name

Example = Sequence[Any] | Callable[[Callable[..., Any]], Any]


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


@dataclass
class DoctorReport:
    pieces: list[PieceRecord]
    findings: list[Finding]
    compiled: bool  # True: through the real backend (Inductor ran); False: analysis only
    use_layername: bool

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
        return self.avoidable == 0

    def format(self, max_findings: int = 5) -> str:
        lines = [
            f"layerpass doctor: {len(self.pieces)} compiled pieces, {self.num_unique} unique, "
            f"{self.num_structures} distinct structures "
            f"({'compiled through the backend' if self.compiled else 'analysis only, no Inductor'}; "
            f"VLLM_USE_LAYERNAME switch {'on' if self.use_layername else 'off'})"
        ]
        if self.ok:
            lines.append("OK: every piece that shares a structure shares one compiled artifact.")
            return "\n".join(lines)
        lines.append(f"PROBLEM: {self.avoidable} avoidable compile(s): pieces equal except for constants.")
        for f in self.findings[:max_findings]:
            lines.append(f"  - {f.message()}")
        if len(self.findings) > max_findings:
            lines.append(f"  ... and {len(self.findings) - max_findings} more such piece(s)")
        return "\n".join(lines)


def _op_label(target: str) -> str:
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
        if not layerpass.HAS_OPAQUE_TYPE:
            return (f"this torch ({torch.__version__}) has no hoisted opaque types, so layer names stay str "
                    "constants; torch>=2.11 shares one compile across layers")
        if not layerpass.USE_LAYERNAME:
            return "VLLM_USE_LAYERNAME is off, so layer names are str constants: turn it on (unset it or set 1)"
        return ("pass a LayerName instead (layerpass.ops.encode_layer_name(prefix) inside forward, "
                "the op's argument typed LayerNameType)")
    return "this str is baked into the graph: pass it as an input or make it the same in every layer"


def _diff(a: PieceRecord, b: PieceRecord, layer_names: set[str]) -> list[ConstantDiff]:
    if len(a.constants) == len(b.constants):
        pairs = zip(a.constants, b.constants)
        return [ConstantDiff(_op_label(cb[1]), ca[2], cb[2], cb[2] in layer_names or ca[2] in layer_names)
                for ca, cb in pairs if ca[2] != cb[2] or ca[1] != cb[1]]
    # Equal structure implies equal constant positions; be robust anyway.
    va = {(c[1], c[2]) for c in a.constants}
    return [ConstantDiff(_op_label(t), None, v, v in layer_names) for t, v in ((c[1], c[2]) for c in b.constants)
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


class _AnalysisBackend:
    """A Dynamo backend that splits and hashes exactly as the layerpass backend does, then runs eagerly."""

    def __init__(self, split: str, splitting_ops: tuple[str, ...]) -> None:
        self.split = split
        self.splitting_ops = splitting_ops
        self.graphs: list[list[PieceRecord]] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        from layerpass.backend.compiler import walk_pieces
        from layerpass.backend.piece_hash import piece_signature
        from layerpass.backend.split import split_graph

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
    from layerpass.backend.compiler import mark_token_dims

    def call(*args: Any, **kwargs: Any) -> Any:
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


def diagnose(model: nn.Module, example: Example, *, compile: bool = True, config: Any = None) -> DoctorReport:
    """Compile ``model`` on ``example`` and explain pieces that are equal except for constants.

    - ``example``: the positional inputs, or ``run(fn)`` that calls ``fn`` on them (``Step.run``).
    - ``compile=True`` goes through the real backend on the whole model (Inductor per unique piece,
      cache disabled); ``compile=False`` splits and hashes identically but runs eagerly (seconds, not minutes).
    - ``config``: a ``CompilationConfig`` (its ``split`` decides the pieces).

    Calls ``torch._dynamo.reset()`` first, so the model is traced afresh even if it was compiled
    before (other compiled functions of the process recompile on their next call)."""
    from layerpass.backend.config import CompilationConfig
    from layerpass.backend.report import compile_reports

    if not isinstance(model, nn.Module):
        raise TypeError(f"doctor: model must be a torch.nn.Module, got {type(model).__name__}")
    if config is None:
        config = CompilationConfig(cache_dir=tempfile.mkdtemp(prefix="layerpass-doctor-"), disable_cache=True)
    elif not isinstance(config, CompilationConfig):
        raise TypeError(f"doctor: config must be a layerpass CompilationConfig, got {type(config).__name__}")
    torch._dynamo.reset()  # a model compiled before in this process must be traced again
    if compile:
        from layerpass.backend.compiler import LayerpassBackend

        # the whole model through the real backend, as the analysis below sees it (not per region)
        before = len(compile_reports())
        compiled = torch.compile(model, backend=LayerpassBackend(config))
        _run_example(example, _mark_dynamic(compiled) if config.dynamic_tokens else compiled)
        graphs = []
        for report in compile_reports()[before:]:
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
    return DoctorReport(pieces, find_avoidable(pieces, model), compile, layerpass.USE_LAYERNAME)
