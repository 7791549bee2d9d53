"""Fusion pass statistics: pass time and pattern registrations vs layer count, LayerName on vs off.

    python -m layerpass.bench.fusion_stats [--model llama-fp8] [--layers 2,32] [--switch on,off] [--json]

Every (switch, layers) point runs in a FRESH subprocess (``VLLM_USE_LAYERNAME`` is read at import)
with its own empty Inductor and layerpass caches, so every unique piece is compiled cold and every
pass runs. With the switch on, one registration per pattern serves all layers and the layer
pieces are one compile; with it off, each layer name is a graph constant: one registration per
layer for each named pattern, and one compile per layer.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from typing import Any

from layerpass.bench.fresh_process import run_cold

RESULT_PREFIX = "FUSION-STATS:"

_CHILD = textwrap.dedent("""\
    import json, sys, tempfile, time
    import torch
    torch.set_num_threads(1)
    import layerpass
    from layerpass.models import build_model, make_step
    from layerpass.backend.config import CompilationConfig
    name, layers = sys.argv[1], int(sys.argv[2])
    model = build_model(name, num_layers=layers)
    step = make_step(model, num_decodes=2, prefill_lens=[3, 5])
    with torch.no_grad():
        ref = step.run(model)
        compiled = layerpass.compile(model, CompilationConfig(disable_cache=True))
        t0 = time.perf_counter()
        out = step.run(compiled)
        wall = time.perf_counter() - t0
    r = layerpass.last_compile_report()
    regs = {p.name: p.registrations for p in compiled.backend.pass_manager.passes if p.registrations}
    print(%r + json.dumps({
        "use_layername": layerpass.USE_LAYERNAME, "layers": layers, "registrations": regs,
        "report_registrations": r.registrations, "pass_time_s": r.pass_time_s, "matches": r.matches,
        "matches_compiled": r.matches_compiled, "num_compiled": r.num_compiled, "num_pieces": r.num_pieces,
        "pass_failures": r.pass_failures, "compile_wall_s": wall,
        "max_abs_diff": float((out - ref).abs().max()),
    }), flush=True)
""") % RESULT_PREFIX


def measure(model: str, layers: int, use_layername: bool, timeout: float = 1800) -> dict[str, Any]:
    """Compile ``model`` with ``layers`` layers in a fresh process; returns its pass statistics."""
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    result, _ = run_cold(["-c", _CHILD, model, str(layers)], use_layername=use_layername, prefix=RESULT_PREFIX,
                         timeout=timeout, what=f"fusion_stats child ({model}, {layers} layers)")
    return result


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ("switch", "layers", "pieces", "compiled", "registrations (total)", "pass time s (fusions)",
            "matches attn/norm/act/moe", "matches_compiled")
    fusions = ("fuse_attn_quant", "fuse_norm_quant", "fuse_act_quant", "fuse_moe")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        regs = r["registrations"]
        lines.append(" | ".join([
            "on" if r["use_layername"] else "off", str(r["layers"]), str(r["num_pieces"]), str(r["num_compiled"]),
            f"{sum(regs.values())} ({', '.join(f'{k[5:]}={v}' for k, v in sorted(regs.items()))})",
            f"{sum(r['pass_time_s'].get(k, 0.0) for k in fusions):.3f}",
            "/".join(str(r["matches"].get(k, 0)) for k in fusions),
            "/".join(str(r["matches_compiled"].get(k, 0)) for k in fusions),
        ]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-fp8")
    ap.add_argument("--layers", default="2,32", help="comma-separated layer counts")
    ap.add_argument("--switch", default="on,off", help="'on', 'off' or 'on,off' (VLLM_USE_LAYERNAME)")
    ap.add_argument("--json", action="store_true", help="print the raw rows as JSON too")
    args = ap.parse_args(argv)
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
            rows.append(measure(args.model, n, s == "on"))
            print(f"# {args.model} switch={s} layers={n}: done", file=sys.stderr, flush=True)
    print(format_table(rows))
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
