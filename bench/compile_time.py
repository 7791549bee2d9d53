"""Cold compile time of a zoo model vs layer count, layer-name switch on and off.

    python -m layerpass.bench.compile_time [--model llama] [--layers 2 8 32] [--json out.json]

Every (layers, switch) cell runs in a FRESH subprocess with an empty layerpass cache dir and an
empty ``TORCHINDUCTOR_CACHE_DIR``, so nothing is shared between cells: each number is a true
cold start. ``VLLM_USE_LAYERNAME`` is read at import, which is the other reason for a process per
cell. The worker builds the model, runs one decode-first step eagerly, compiles with
``layerpass.compile`` and runs the step once; it reports the compile report's seconds (Dynamo,
layerpass split + Inductor, total), the piece counts, the first compiled call's wall time and
the largest difference from eager. With the switch on the unique pieces (and the compile time)
should stay flat as layers grow; with it off every layer is its own compile.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any

from layerpass.bench.fresh_process import run_cold

RESULT_PREFIX = "COMPILE-TIME-RESULT:"
COLUMNS = [("layers", "{:>6}"), ("switch", "{:>6}"), ("pieces", "{:>6}"), ("unique", "{:>6}"),
           ("compiled", "{:>8}"), ("dynamo_s", "{:>8.2f}"), ("compile_s", "{:>9.2f}"), ("total_s", "{:>8.2f}"),
           ("first_call_s", "{:>12.2f}"), ("process_s", "{:>9.2f}"), ("max_err", "{:>9.1e}")]


def worker(model_name: str, layers: int) -> dict[str, Any]:
    """One cold compile in this process (the caller set up the environment)."""
    import torch

    torch.set_num_threads(1)  # the eager reference; compile time is what is measured
    import layerpass
    from layerpass.models import build_model, make_step
    from layerpass.backend.config import CompilationConfig

    model = build_model(model_name, num_layers=layers)
    step = make_step(model, num_decodes=2, prefill_lens=[3, 5])
    with torch.no_grad():
        ref = step.run(model)
        compiled = layerpass.compile(model, CompilationConfig())  # cache_dir from LAYERPASS_CACHE_DIR
        t0 = time.perf_counter()
        out = step.run(compiled)
        first = time.perf_counter() - t0
    r = layerpass.last_compile_report()
    return {"layers": layers, "switch": "on" if layerpass.USE_LAYERNAME else "off", "pieces": r.num_pieces,
            "unique": r.num_unique_pieces, "compiled": r.num_compiled, "cache_hits": r.num_cache_hits,
            "dynamo_s": r.dynamo_s, "compile_s": r.compile_s, "total_s": r.total_s, "first_call_s": first,
            "max_err": (out - ref).abs().max().item()}


def run_cell(model_name: str, layers: int, switch_on: bool, timeout: float) -> dict[str, Any]:
    """``worker`` in a fresh interpreter with empty caches (``bench.fresh_process.run_cold``)."""
    result, wall = run_cold(["-m", "layerpass.bench.compile_time", "--worker", "--model", model_name, "--layers", str(layers)],
                            use_layername=switch_on, prefix=RESULT_PREFIX, timeout=timeout,
                            what=f"{model_name} at {layers} layers")
    result["process_s"] = wall
    return result


def format_table(rows: list[dict[str, Any]]) -> str:
    widths = [int(re.match(r"\{:>(\d+)", fmt).group(1)) for _, fmt in COLUMNS]
    header = "  ".join(name.rjust(w) for (name, _), w in zip(COLUMNS, widths))
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append("  ".join(fmt.format(row[name]) for name, fmt in COLUMNS))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m layerpass.bench.compile_time", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama", help="zoo model name (default: llama)")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32], help="layer counts (default: 2 8 32)")
    p.add_argument("--switch", choices=["both", "on", "off"], default="both", help="VLLM_USE_LAYERNAME setting(s)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per cell before it is abandoned")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if any(n < 1 for n in args.layers):
        p.error(f"--layers must be positive, got {args.layers}")
    if args.worker and len(args.layers) != 1:
        p.error("--worker takes exactly one --layers value")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_PREFIX + json.dumps(worker(args.model, args.layers[0])), flush=True)
        return 0
    switches = {"both": [True, False], "on": [True], "off": [False]}[args.switch]
    rows = []
    for layers in args.layers:
        for on in switches:
            rows.append(run_cell(args.model, layers, on, args.timeout))
            print(f"  {args.model} {layers} layers, switch {rows[-1]['switch']}: {rows[-1]['total_s']:.2f} s",
                  file=sys.stderr, flush=True)
    print(f"cold compile of {args.model!r}, one fresh process per row (empty layerpass and Inductor caches)")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
