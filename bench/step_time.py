"""Steady-state step time: eager vs ``layerpass.compile`` vs plain Inductor, interleaved in one process.

    layerpass step-time                                  # llama 16 layers, decode + mixed
    layerpass step-time --models llama,llama-fp8,moe --layers 16,80
    layerpass step-time --models hf-llama --hf-config bench/configs/llama-3.2-1b.json --layers 4

Each (model, layers) is built once and compiled by each mode (first calls excluded); then the
modes take turns, one step each, ``--repeats`` times, on the same step inputs, and the median of
each is reported with the ratios layerpass / eager and layerpass / inductor. Batches: ``decode``
(8 decodes with a KV history) and ``mixed`` (4 decodes + prefills of 32 and 16 tokens).

``--hf-config PATH`` takes a Hugging Face ``config.json`` (or a checkpoint directory holding one):
the model is built from it with random weights (``num_hidden_layers`` set from ``--layers``) and
converted with ``from_transformers``; its rows are the zoo name ``hf-config:PATH``. To run a real
checkpoint instead, load it with transformers and convert it (README, Hugging Face section).

Timings are single-threaded (``--threads``, default 1) and ratios of one run; there is no time
budget, so a slow machine gives the same complete table, later.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

BATCHES = {"decode": (8, ()), "mixed": (4, (32, 16))}
MODES = ("eager", "layerpass", "inductor")


@dataclass
class Row:
    model: str
    layers: int
    batch: str
    eager_ms: float
    layerpass_ms: float
    inductor_ms: float
    max_abs_err: float

    @property
    def vs_eager(self) -> float:
        return self.layerpass_ms / self.eager_ms

    @property
    def vs_inductor(self) -> float:
        return self.layerpass_ms / self.inductor_ms


def interleaved_ms(step: Any, fns: dict[str, Callable[..., Any]], repeats: int,
                   sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Milliseconds of each of ``fns``' steps: the fns take turns, one ``step.run(fn)`` each, for
    ``repeats`` rounds, so drift in the machine's load hits them alike; ``sync`` (a device's
    synchronize) is waited for before and after each step. The one step-time method:
    ``layerpass step-time``, the sweep's step column and ``gpu-check`` (``bench/measure.py``) all
    time with it and report the median."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            step.run(fn)
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def measure(name: str, layers: int, batches: Sequence[str], repeats: int, log: Callable[[str], None]) -> list[Row]:
    import layerpass
    from layerpass.models import build_model, make_step

    model = build_model(name, num_layers=layers).eval()
    cache = tempfile.mkdtemp(prefix="layerpass-step-")
    compiled = {
        "eager": model,
        "layerpass": layerpass.compile(model, layerpass.CompilationConfig(cache_dir=cache)),
        "inductor": torch.compile(model, backend="inductor", dynamic=True),
    }
    rows = []
    for batch in batches:
        decodes, prefills = BATCHES[batch]
        step = make_step(model, num_decodes=decodes, prefill_lens=list(prefills))
        try:
            outs = {}
            for mode, fn in compiled.items():
                t0 = time.perf_counter()
                outs[mode] = step.run(fn)  # compiles (first call), then the timed loop below
                log(f"  {name} x{layers} {batch}: {mode} first call {time.perf_counter() - t0:.1f} s")
            ms = {m: statistics.median(t) for m, t in interleaved_ms(step, compiled, repeats).items()}
            err = (outs["layerpass"].float() - outs["eager"].float()).abs().max().item()
            rows.append(Row(name, layers, batch, ms["eager"], ms["layerpass"], ms["inductor"], err))
        finally:
            step.release()
    return rows


def table(rows: Sequence[Row]) -> str:
    lines = ["| model | layers | batch | eager ms | layerpass ms | inductor ms | layerpass / eager | layerpass / inductor | max abs err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.layers} | {r.batch} | {r.eager_ms:.2f} | {r.layerpass_ms:.2f} | "
                     f"{r.inductor_ms:.2f} | {r.vs_eager:.2f} | {r.vs_inductor:.2f} | {r.max_abs_err:.1e} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="layerpass step-time", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="llama", help="comma-separated zoo names (default llama); "
                   "--hf-config adds an hf-config:PATH row")
    p.add_argument("--layers", default="16", help="comma-separated layer counts (default 16)")
    p.add_argument("--batches", default="decode,mixed", help=f"comma-separated, of {', '.join(BATCHES)}")
    p.add_argument("--repeats", type=int, default=15, help="steps timed per mode (median; default 15)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--hf-config", metavar="PATH", help="a Hugging Face config.json or a checkpoint directory")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if args.hf_config:
        models.append(f"hf-config:{os.path.abspath(args.hf_config)}")
    try:
        from layerpass.bench.config import check_models

        check_models(models)
    except ValueError as e:
        p.error(str(e))
    try:
        layers = [int(n) for n in args.layers.split(",") if n]
    except ValueError:
        p.error(f"--layers takes comma-separated integers, got {args.layers!r}")
    batches = [b for b in args.batches.split(",") if b]
    unknown = sorted(set(batches) - set(BATCHES))
    if unknown or not batches:
        p.error(f"--batches: unknown {unknown}; allowed: {', '.join(BATCHES)}")
    if args.repeats < 1 or any(n < 1 for n in layers):
        p.error("--repeats and --layers must be >= 1")
    torch.set_num_threads(args.threads)
    rows: list[Row] = []
    for name in models:
        for n in layers:
            rows += measure(name, n, batches, args.repeats, lambda s: print(s, file=sys.stderr, flush=True))
    print(table(rows))
    print(f"\n{len(rows)} rows; median of {args.repeats} interleaved steps per mode, {args.threads} thread(s), "
          f"torch {torch.__version__}.\nCommand: `layerpass step-time {' '.join(argv if argv is not None else sys.argv[1:])}`")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
