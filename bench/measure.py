"""One measurement, run inside its own process: ``python -m layerpass.bench.measure ...``.

The sweep (``bench/sweep.py``) starts this through ``bench/runner.py`` with
``TORCHINDUCTOR_CACHE_DIR`` and ``LAYERPASS_CACHE_DIR`` pointing at fresh temporary directories
(``--phase cold``), then again in a new process on the same directories (``--phase warm``). It
builds the zoo model and its step (``bench/case.py``), runs the step eagerly as the reference,
compiles it in the requested mode, times the first call (from the compile call to the end of the
first compiled step: Dynamo + compile or warm-start load + one step) and (cold only) the
steady-state step latency of compiled and eager, and prints one JSON object as the runner's result
line (``--out`` also writes it to a file). Layerpass modes also record the compile report's
``trace``, ``num_regions`` and ``warm_start`` (read with ``getattr``: ``None`` on a backend
without them). The ``inductor`` and ``regional`` modes compile with Inductor as
``torch.compile(backend="inductor")`` does (``inductor_backend``).

Why a process per measurement: Dynamo, Inductor and layerpass keep in-process caches; only a
fresh process measures what a user's first (or restarted) run pays.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from .case import build_case
from .kernels import DTYPES
from .runner import emit_result

MODES = ("layerpass", "layerpass-str", "inductor", "regional")
PHASES = ("cold", "warm")


class _CompileClock:
    """Dynamo time (compile start -> backend entry) and backend time, summed over compiled frames."""

    def __init__(self) -> None:
        import torch._dynamo.callback

        self.start = 0.0
        self.dynamo_s = 0.0
        self.compile_s = 0.0
        self.frames = 0
        self.origin = time.perf_counter()  # reset to the compile call by the caller
        self.spans: list[dict[str, Any]] = []  # the same records as a layerpass report's timeline
        torch._dynamo.callback.on_compile_start(self._on_start)

    def _span(self, what: str, start: float, end: float) -> None:
        self.spans.append({"what": what, "start_s": start - self.origin, "end_s": end - self.origin,
                           "duration_s": end - start})

    def _on_start(self, *_args: Any) -> None:
        self.start = time.perf_counter()

    def wrap(self, backend: Callable[..., Any]) -> Callable[..., Any]:
        def timed(gm: Any, example_inputs: Any) -> Any:
            enter = time.perf_counter()
            if self.start:
                self.dynamo_s += enter - self.start
                self._span("Dynamo", self.start, enter)
            try:
                return backend(gm, example_inputs)
            finally:
                done = time.perf_counter()
                self.compile_s += done - enter
                self.frames += 1
                self._span("Inductor compile (its ISA probe included)", enter, done)

        return timed


def _dynamic_tokens(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark the token dim of every tensor input dynamic, as ``layerpass.compile`` does (fairness)."""
    from layerpass.backend.pieces.compiler import mark_token_dims

    def call(*args: Any) -> Any:
        mark_token_dims(args)
        return fn(*args)

    return call


_BOILERPLATE = ("Set TORCHDYNAMO_VERBOSE", "Use tlparse", "For even more developer context")


def _reason(exc: BaseException) -> str:
    """The first informative lines of an exception, short enough for a table cell."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.strip().startswith(_BOILERPLATE)]
    text = f"{type(exc).__name__}: " + " | ".join(lines[:2]) if lines else type(exc).__name__
    return text[:300]


def _joined(values: list[Any]) -> Any:
    """One value if all reports agree, else the distinct values joined with "; " (None if none known)."""
    distinct = list(dict.fromkeys(v for v in values if v is not None))
    if not distinct:
        return None
    return distinct[0] if len(distinct) == 1 else "; ".join(str(v) for v in distinct)


def _layerpass_stats(before: int) -> dict[str, Any]:
    """The figures of this process's layerpass compile reports (summed if there were several graphs).

    ``trace``, ``num_regions`` and ``warm_start`` are read with ``getattr``: a backend without them
    gives ``None``."""
    from layerpass.backend.report.compile_report import compile_reports
    from layerpass.backend.report.timeline import as_records

    reports = compile_reports(since=before)
    if not reports:
        raise RuntimeError("layerpass mode: the backend produced no compile report (was the model compiled?)")
    matches: dict[str, int] = {}
    for r in reports:
        for k, v in r.matches.items():
            matches[k] = matches.get(k, 0) + int(v)
    regions = [getattr(r, "num_regions", None) for r in reports]
    return {
        "trace": _joined([getattr(r, "trace", None) for r in reports]),
        "num_regions": None if any(n is None for n in regions) else int(sum(regions)),
        "warm_start": _joined([getattr(r, "warm_start", None) for r in reports]),
        "total_s": sum(getattr(r, "total_s", 0.0) for r in reports),
        "dynamo_s": sum(r.dynamo_s for r in reports),
        "compile_s": sum(r.compile_s for r in reports),
        "graphs": len(reports),
        "pieces": sum(r.num_pieces for r in reports),
        "unique_pieces": sum(r.num_unique_pieces for r in reports),
        "compiled_pieces": sum(r.num_compiled for r in reports),
        "cache_hits": sum(r.num_cache_hits for r in reports),
        "fusion_matches": matches,
        "pass_failures": [f for r in reports for f in r.pass_failures],
        "timeline": as_records(getattr(reports[0], "timeline", [])),  # the first call's
    }


def inductor_backend() -> Callable[..., Any]:
    """The backend registered as ``"inductor"`` (what ``backend="inductor"`` names), as a function.

    Why not the string: the clock must see the moment Dynamo hands a graph to the backend, to split
    Dynamo's time from Inductor's the way the layerpass backend reports it, so it wraps a function.
    ``torch._dynamo.lookup_backend`` (in ``torch._dynamo.__all__``) is how Dynamo itself turns a
    backend name into that function; torch has no public spelling of it, so it is called here only."""
    import torch._dynamo

    return torch._dynamo.lookup_backend("inductor")


def _build_compiled(model: Any, mode: str, clock: _CompileClock) -> Callable[..., Any]:
    import torch

    import layerpass

    if mode in ("layerpass", "layerpass-str"):
        want = mode == "layerpass"
        if layerpass.USE_LAYERNAME != want:
            raise RuntimeError(
                f"mode {mode!r} needs the layer-name switch {'on' if want else 'off'}, but USE_LAYERNAME="
                f"{layerpass.USE_LAYERNAME} (HAS_OPAQUE_TYPE={layerpass.HAS_OPAQUE_TYPE}); run with "
                f"VLLM_USE_LAYERNAME={'1' if want else '0'} (the sweep sets it)"
            )
        return layerpass.compile(model, layerpass.CompilationConfig())  # cache dir: $LAYERPASS_CACHE_DIR
    if mode == "regional":
        from layerpass.bench.regional import apply_nested_compile_region

        apply_nested_compile_region(model)
    elif mode != "inductor":
        raise ValueError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    return _dynamic_tokens(torch.compile(model, backend=clock.wrap(inductor_backend())))


def _import_inductor() -> float:
    """Import Inductor's modules before the clock, the same in every mode, and say how long it took.

    Every mode pays this once per process, whether the first call compiles or loads; which mode
    triggers the import lazily inside its first call must not decide the figure. The modules are
    the ones layerpass's own first call imports (``import_inductor_modules``)."""
    from layerpass.backend.pieces.isa_probe import import_inductor_modules

    t = time.perf_counter()
    import_inductor_modules()
    return time.perf_counter() - t


def synced(device: str) -> Callable[[], None]:
    """What ends a timed region on ``device``: waiting for its queued work (nothing on CPU)."""
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _timed_steps(step: Any, fns: dict[str, Callable[..., Any]], repeats: int,
                 device: str = "cpu") -> dict[str, tuple[float, float]]:
    """(median, min) milliseconds per step of each fn, by ``layerpass step-time``'s method
    (``step_time.interleaved_ms``: one step each in turn, the device synced around each). The min
    is reported too: on a shared machine it is the figure least disturbed by other load."""
    from .step_time import interleaved_ms

    times = interleaved_ms(step, fns, repeats, sync=synced(device))
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def measure(model_name: str, layers: int, mode: str, phase: str, *, repeats: int = 20, device: str = "cpu",
            dtype: Any = None) -> dict[str, Any]:
    """Run one measurement in this process and return its row fragment (see bench/README.md);
    ``device`` / ``dtype`` (default: the model's): where and in what the model runs."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; allowed: {', '.join(PHASES)}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    import torch

    import layerpass
    from layerpass.backend.report.compile_report import num_compile_reports

    row: dict[str, Any] = {"model": model_name, "layers": layers, "mode": mode, "phase": phase,
                           "use_layername": layerpass.USE_LAYERNAME}
    stage = "build"
    try:
        with torch.no_grad():
            model, step = build_case(model_name, layers, device=device, dtype=dtype)
            ref = step.run(model)
            stage = "compile"
            row["inductor_import_s"] = _import_inductor()
            clock = _CompileClock()
            before = num_compile_reports()
            # "first call": from the compile call (a backend may load a saved program there) to the
            # end of the first compiled step; imports (Inductor's included, above, in every mode), model
            # build and the eager reference are outside
            t = clock.origin = time.perf_counter()
            compiled = _build_compiled(model, mode, clock)
            out = step.run(compiled)
            synced(device)()
            first = time.perf_counter() - t
            row["first_call_s"] = first
            if mode.startswith("layerpass"):
                row.update(_layerpass_stats(before))
            else:
                row.update({"dynamo_s": clock.dynamo_s, "compile_s": clock.compile_s, "graphs": clock.frames,
                            "timeline": clock.spans})
            stage = "check"
            row["max_abs_err"] = float((out.float() - ref.float()).abs().max())
            row["ref_max_abs"] = float(ref.float().abs().max())
            if phase == "cold":
                stage = "steady-state"
                ms = _timed_steps(step, {"compiled": compiled, "eager": model}, repeats, device)
                row.update({"step_ms_compiled": ms["compiled"][0], "step_ms_eager": ms["eager"][0],
                            "step_ms_compiled_min": ms["compiled"][1], "step_ms_eager_min": ms["eager"][1],
                            "repeats": repeats})
            if mode.startswith("layerpass"):
                row["recompiles"] = getattr(compiled, "recompiles", None)
        row["status"] = "ok"
    except Exception as e:  # recorded, not hidden: the row says what failed and why
        row.update({"status": "failed", "failed_stage": stage, "reason": f"[{stage}] {_reason(e)}",
                    "traceback_tail": traceback.format_exc()[-2000:]})
    return row


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m layerpass.bench.measure", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument("--phase", required=True, choices=PHASES)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (eager and compiled alike)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the model runs (default cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="the model's dtype (default: the zoo model's)")
    p.add_argument("--import", dest="imports", action="append", default=[],
                   help="module to import first (registers extra zoo models)")
    p.add_argument("--out", help="write the row here as JSON (also printed on stdout)")
    args = p.parse_args(argv)
    import importlib

    import torch

    torch.set_num_threads(args.threads)
    for name in args.imports:
        importlib.import_module(name)
    row = measure(args.model, args.layers, args.mode, args.phase, repeats=args.repeats, device=args.device,
                  dtype=None if args.dtype is None else DTYPES[args.dtype])
    row["pid"] = os.getpid()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(row, f)
    emit_result(row)
    return 0 if row["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
