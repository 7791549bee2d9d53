"""Cold compile time of a zoo model vs layer count, layer-name switch on and off.

    python -m layerpass.bench.compile_time [--model llama] [--layers 2 8 32] [--json out.json]

Every (layers, switch) cell runs in a FRESH subprocess with an empty layerpass cache dir and an
empty ``TORCHINDUCTOR_CACHE_DIR`` (``bench/runner.py``), so nothing is shared between cells: each
number is a true cold start. ``VLLM_USE_LAYERNAME`` is read at import, which is the other reason
for a process per cell. The worker builds the model, runs one decode-first step eagerly, compiles with
``layerpass.compile`` and runs the step once; it reports the compile report's seconds (Dynamo,
layerpass split + Inductor, total), the piece counts, the first compiled call's wall time and
the largest difference from eager. With the switch on the unique pieces (and the compile time)
should stay flat as layers grow; with it off every layer is its own compile. A cell that fails
or passes ``--timeout`` is shown as ``-`` with the reason under the table; the other cells still run.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from layerpass.bench.case import first_compiled_call
from layerpass.bench.runner import FreshRunError, emit_result, run_cold

COLUMNS = [("layers", "{:>6}"), ("switch", "{:>6}"), ("pieces", "{:>6}"), ("unique", "{:>6}"),
           ("compiled", "{:>8}"), ("dynamo_s", "{:>8.2f}"), ("compile_s", "{:>9.2f}"), ("total_s", "{:>8.2f}"),
           ("first_call_s", "{:>12.2f}"), ("process_s", "{:>9.2f}"), ("max_err", "{:>9.1e}")]


def worker(model_name: str, layers: int) -> dict[str, Any]:
    """One cold compile in this process (the caller set up the environment)."""
    import torch

    torch.set_num_threads(1)  # the eager reference; compile time is what is measured
    import layerpass
    from layerpass.backend.config import CompilationConfig

    run = first_compiled_call(model_name, layers, CompilationConfig())  # cache_dir from LAYERPASS_CACHE_DIR
    r = layerpass.last_compile_report()
    return {"layers": layers, "switch": "on" if layerpass.USE_LAYERNAME else "off", "pieces": r.num_pieces,
            "unique": r.num_unique_pieces, "compiled": r.num_compiled, "cache_hits": r.num_cache_hits,
            "dynamo_s": r.dynamo_s, "compile_s": r.compile_s, "total_s": r.total_s, "first_call_s": run.first_call_s,
            "max_err": run.max_abs_err}


def run_cell(model_name: str, layers: int, switch_on: bool, timeout: float) -> dict[str, Any]:
    """``worker`` in a fresh interpreter with empty caches; a failure or timeout is a row with an ``error``."""
    switch = "on" if switch_on else "off"
    try:
        result, wall = run_cold(["-m", "layerpass.bench.compile_time", "--worker", "--model", model_name,
                                 "--layers", str(layers)], use_layername=switch_on, timeout_s=timeout,
                                what=f"{model_name} at {layers} layers (switch {switch})")
    except FreshRunError as e:  # the table keeps the cell, with the reason under it
        return {"layers": layers, "switch": switch, "error": e.reason}
    result["process_s"] = wall
    return result


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width table; a failed cell's figures are ``-`` and its reason follows the table."""
    widths = [int(re.match(r"\{:>(\d+)", fmt).group(1)) for _, fmt in COLUMNS]
    header = "  ".join(name.rjust(w) for (name, _), w in zip(COLUMNS, widths))
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append("  ".join(fmt.format(row[name]) if name in row else "-".rjust(w)
                               for (name, fmt), w in zip(COLUMNS, widths)))
    lines += [row["error"] for row in rows if "error" in row]
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
        emit_result(worker(args.model, args.layers[0]))
        return 0
    switches = {"both": [True, False], "on": [True], "off": [False]}[args.switch]
    rows = []
    for layers in args.layers:
        for on in switches:
            rows.append(run_cell(args.model, layers, on, args.timeout))
            done = rows[-1].get("error") or f"{rows[-1]['total_s']:.2f} s"
            print(f"  {args.model} {layers} layers, switch {rows[-1]['switch']}: {done}", file=sys.stderr, flush=True)
    print(f"cold compile of {args.model!r}, one fresh process per row (empty layerpass and Inductor caches)")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
