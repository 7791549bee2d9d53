"""Fusion pass statistics: pass time and pattern registrations vs layer count, LayerName on vs off.

    python -m layerpass.bench.fusion_stats [--model llama-fp8] [--layers 2,32] [--switch on,off] [--json]

Every (switch, layers) point runs in a FRESH subprocess (``VLLM_USE_LAYERNAME`` is read at import)
with its own empty Inductor and layerpass caches (``bench/runner.py``), so every unique piece is
compiled cold and every pass runs. With the switch on, one registration per pattern serves all
layers and the layer pieces are one compile; with it off, each layer name is a graph constant: one
registration per layer for each named pattern, and one compile per layer. A point that fails is
``-`` with the reason under the table; the other points still run.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from layerpass.bench.case import first_compiled_call
from layerpass.bench.runner import FreshRunError, emit_result, run_cold

FUSIONS = ("fuse_attn_quant", "fuse_norm_quant", "fuse_act_quant", "fuse_moe")


def worker(model: str, layers: int) -> dict[str, Any]:
    """One cold compile in this process (the caller set up the environment); its pass statistics."""
    import torch

    torch.set_num_threads(1)
    import layerpass
    from layerpass.backend.config import CompilationConfig

    run = first_compiled_call(model, layers, CompilationConfig(disable_cache=True))
    r = layerpass.last_compile_report()
    regs = {p.name: p.registrations for p in run.compiled.backend.pass_manager.passes if p.registrations}
    return {"use_layername": layerpass.USE_LAYERNAME, "layers": layers, "registrations": regs,
            "report_registrations": r.registrations, "pass_time_s": r.pass_time_s, "matches": r.matches,
            "matches_compiled": r.matches_compiled, "num_compiled": r.num_compiled, "num_pieces": r.num_pieces,
            "pass_failures": r.pass_failures, "compile_wall_s": run.first_call_s, "max_abs_diff": run.max_abs_err}


def measure(model: str, layers: int, use_layername: bool, timeout: float = 1800) -> dict[str, Any]:
    """Compile ``model`` with ``layers`` layers in a fresh process; returns its pass statistics.

    Raises ``FreshRunError`` (a ``RuntimeError``) if the process fails or passes ``timeout``."""
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    result, _ = run_cold(["-m", "layerpass.bench.fusion_stats", "--worker", "--model", model, "--layers", str(layers)],
                         use_layername=use_layername, timeout_s=timeout,
                         what=f"fusion_stats child ({model}, {layers} layers, switch {'on' if use_layername else 'off'})")
    return result


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ("switch", "layers", "pieces", "compiled", "registrations (total)", "pass time s (fusions)",
            "matches attn/norm/act/moe", "matches_compiled")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        if "error" in r:  # the row stays in the table; the reason follows it
            lines.append(" | ".join(["on" if r["use_layername"] else "off", str(r["layers"])] + ["-"] * (len(head) - 2)))
            continue
        regs = r["registrations"]
        lines.append(" | ".join([
            "on" if r["use_layername"] else "off", str(r["layers"]), str(r["num_pieces"]), str(r["num_compiled"]),
            f"{sum(regs.values())} ({', '.join(f'{k[5:]}={v}' for k, v in sorted(regs.items()))})",
            f"{sum(r['pass_time_s'].get(k, 0.0) for k in FUSIONS):.3f}",
            "/".join(str(r["matches"].get(k, 0)) for k in FUSIONS),
            "/".join(str(r["matches_compiled"].get(k, 0)) for k in FUSIONS),
        ]))
    lines += [r["error"] for r in rows if "error" in r]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-fp8")
    ap.add_argument("--layers", default="2,32", help="comma-separated layer counts")
    ap.add_argument("--switch", default="on,off", help="'on', 'off' or 'on,off' (VLLM_USE_LAYERNAME)")
    ap.add_argument("--json", action="store_true", help="print the raw rows as JSON too")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # the child of ``measure``
    args = ap.parse_args(argv)
    if args.worker:
        emit_result(worker(args.model, int(args.layers)))
        return 0
    try:
        layer_counts = [int(x) for x in args.layers.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--layers takes comma-separated ints, got {args.layers!r}")
    switches = [s.strip() for s in args.switch.split(",") if s.strip()]
    if not switches or any(s not in ("on", "off") for s in switches):
        ap.error(f"--switch takes 'on', 'off' or 'on,off', got {args.switch!r}")
    rows = []
    for s in switches:
        for n in layer_counts:
            try:
                rows.append(measure(args.model, n, s == "on"))
            except FreshRunError as e:  # the table keeps the point, with the reason under it
                rows.append({"use_layername": s == "on", "layers": n, "error": e.reason})
            print(f"# {args.model} switch={s} layers={n}: {rows[-1].get('error', 'done')}", file=sys.stderr, flush=True)
    print(format_table(rows))
    if args.json:
        print(json.dumps(rows, indent=1))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
