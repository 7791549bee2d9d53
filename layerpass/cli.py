"""The ``layerpass`` command line: ``layerpass bench`` and ``layerpass doctor``.

- ``bench``: compile-time sweep (models x layer counts x modes, a fresh process per cold/warm
  measurement); prints a Markdown table, writes ``results.json`` and PNG plots.
- ``doctor``: compiles a zoo model and explains pieces that are equal except for constants;
  exits 1 when it finds such avoidable uniqueness (a CI guard).

Exit codes: 0 success, 1 problems found (doctor) or rows that failed (bench ``--strict``),
2 bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any


def _csv(kind: type) -> Any:
    def parse(text: str) -> list[Any]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        try:
            return [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None

    return parse


def _flatten(groups: list[list[Any]] | None) -> list[Any] | None:
    return None if groups is None else [x for g in groups for x in g]


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown_table(doc: dict[str, Any]) -> str:
    """The results as a Markdown table (plus the reasons of rows that are not ok)."""
    head = ("model", "layers", "mode", "status", "dynamo s", "compile s", "first call s", "warm start s",
            "pieces (unique / compiled)", "fusions", "max abs err", "step ms compiled / eager")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    notes = []
    for r in doc["rows"]:
        pieces = "-" if r["pieces"] is None else f"{r['pieces']} ({r['unique_pieces']} / {r['compiled_pieces']})"
        steps = "-" if r["step_ms_compiled"] is None else f"{r['step_ms_compiled']:.2f} / {r['step_ms_eager']:.2f}"
        lines.append("| " + " | ".join((
            r["model"], str(r["layers"]), r["mode"], r["status"], _fmt(r["dynamo_s"], ".1f"), _fmt(r["compile_s"], ".1f"),
            _fmt(r["first_call_s"], ".1f"), _fmt(r["warm_start_s"], ".1f"), pieces, _fmt(r["fusion_matches_total"], "d"),
            _fmt(r["max_abs_err"], ".1e"), steps)) + " |")
        if r["status"] != "ok":
            notes.append(f"- {r['model']} / {r['layers']} layers / {r['mode']}: **{r['status']}**: {r['reason']}")
    m = doc.get("machine", {})
    load = m.get("loadavg_start")
    load = [round(x, 1) for x in load] if load else load
    footer = [f"\nMachine: {m.get('cpu')} ({m.get('cpu_count')} cores), torch {m.get('torch')}, "
              f"load average at start {load}; sweep wall time {doc.get('wall_s', 0):.0f} s."]
    return "\n".join(lines + ([""] + notes if notes else []) + footer)


def _progress(total: int) -> tuple[Any, Any, Any]:
    """(describe, advance, close) callbacks: a tqdm bar on stderr, or plain lines without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        done = [0]

        def describe(text: str) -> None:
            print(f"[{done[0]}/{total}] {text}", file=sys.stderr, flush=True)

        def advance(n: int) -> None:
            done[0] += n

        return describe, advance, lambda: None
    bar = tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True)
    return bar.set_description, bar.update, bar.close


def cmd_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from layerpass.bench import sweep

    models = _flatten(args.models) or list(sweep.QUICK_MODELS if args.quick else sweep.DEFAULT_MODELS)
    layers = _flatten(args.layers) or list(sweep.QUICK_LAYERS if args.quick else sweep.DEFAULT_LAYERS)
    modes = _flatten(args.modes) or list(sweep.MODES)
    budget = args.budget if args.budget is not None else (sweep.QUICK_BUDGET_S if args.quick else sweep.DEFAULT_BUDGET_S)
    try:
        cfg = sweep.SweepConfig(models=tuple(models), layers=tuple(layers), modes=tuple(modes), out_dir=args.out,
                                timeout_s=args.timeout, budget_s=budget or None, repeats=args.repeats,
                                threads=args.threads, jobs=args.jobs if args.jobs is not None else sweep.DEFAULT_JOBS,
                                rel_tolerance=args.tolerance, imports=tuple(args.imports),
                                quick=args.quick, keep_cache=args.keep_cache)
        sweep.check_models(cfg.models, cfg.imports)
    except (ValueError, ImportError) as e:
        parser.error(str(e))
    describe, advance, close = _progress(2 * len(sweep.plan(cfg)))
    try:
        doc = sweep.run_sweep(cfg, describe, advance)
    finally:
        close()
    table = markdown_table(doc)
    print(table)
    with open(os.path.join(cfg.out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    print(f"\nwrote {os.path.join(cfg.out_dir, 'results.json')}", file=sys.stderr)
    if not args.no_plots:
        from layerpass.bench.plots import make_plots

        try:
            for path in make_plots(doc, cfg.out_dir):
                print(f"wrote {path}", file=sys.stderr)
        except ImportError as e:
            print(f"layerpass bench: no plots: {e}", file=sys.stderr)
    bad = [r for r in doc["rows"] if r["status"] != "ok"]
    return 1 if args.strict and bad else 0


def cmd_doctor(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import importlib

    import torch

    from layerpass.backend.doctor import diagnose
    from layerpass.models import build_model, make_step, registered_models
    from layerpass.backend.config import CompilationConfig

    for name in args.imports:
        importlib.import_module(name)
    if args.model not in registered_models():
        parser.error(f"unknown model {args.model!r}; registered models: {', '.join(registered_models())}")
    if args.layers < 1:
        parser.error(f"--layers must be >= 1, got {args.layers}")
    torch.set_num_threads(args.threads)
    config = CompilationConfig(split=args.split, cache_dir=tempfile.mkdtemp(prefix="layerpass-doctor-"), disable_cache=True)
    model = build_model(args.model, num_layers=args.layers)
    step = make_step(model, num_decodes=2, prefill_lens=[3, 5])
    report = diagnose(model, step.run, compile=not args.no_compile, config=config)
    print(report.format(max_findings=args.max_findings))
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    from layerpass.bench.measure import MODES

    p = argparse.ArgumentParser(prog="layerpass", description="layerpass: compile-time benchmarks and diagnostics")
    sub = p.add_subparsers(dest="command", required=True, metavar="{bench,doctor}")

    b = sub.add_parser("bench", help="compile-time sweep: models x layers x modes (cold and warm)",
                       description="Sweep models x layer counts x modes; each cold/warm measurement in a fresh process.")
    b.add_argument("--quick", action="store_true", help="llama only, 2 and 8 layers (under 2 minutes)")
    b.add_argument("--models", type=_csv(str), action="append", help="comma-separated zoo models (default: llama,llama-fp8,moe)")
    b.add_argument("--layers", type=_csv(int), action="append", help="comma-separated layer counts (default: 2,8,32,80)")
    b.add_argument("--modes", type=_csv(str), action="append", help=f"comma-separated modes (default: all: {','.join(MODES)})")
    b.add_argument("--out", default="bench-results", help="output directory (default: bench-results)")
    b.add_argument("--timeout", type=float, default=240.0, help="seconds per measurement process (default 240)")
    b.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole sweep, 0 = unlimited (default: 100 with --quick, else 870)")
    b.add_argument("--repeats", type=int, default=20, help="steady-state steps timed per row (median; default 20)")
    b.add_argument("--jobs", type=int, default=None,
                   help="measurements at once, each single-threaded (default: 2 on 2+ cores; 1 = quietest timings)")
    b.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads in each measurement (default 1)")
    b.add_argument("--tolerance", type=float, default=0.05,
                   help="max abs error vs eager allowed, relative to max(1, max |logits|) (default 0.05)")
    b.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (it registers extra models); repeatable")
    b.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    b.add_argument("--keep-cache", action="store_true", help="keep the per-measurement cache directories")
    b.add_argument("--strict", action="store_true", help="exit 1 if any row is not ok")
    b.set_defaults(func=cmd_bench, parser=b)

    d = sub.add_parser("doctor", help="explain compiled pieces that differ only in constants",
                       description="Compile a zoo model through the layerpass backend and explain pieces that are "
                                   "equal except for constants; exit 1 if there are any.")
    d.add_argument("--model", required=True, help="zoo model name (e.g. moe)")
    d.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    d.add_argument("--split", choices=("layers", "ops"), default="layers", help="backend split mode (default layers)")
    d.add_argument("--no-compile", action="store_true",
                   help="split and hash like the backend but skip Inductor (seconds instead of minutes)")
    d.add_argument("--max-findings", type=int, default=5, help="findings printed in full (default 5)")
    d.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    d.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (it registers extra models); repeatable")
    d.set_defaults(func=cmd_doctor, parser=d)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args, args.parser))  # the subcommand's parser reports its usage errors


if __name__ == "__main__":
    sys.exit(main())
