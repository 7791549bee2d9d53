"""The ``layerpass`` command line: ``bench``, ``step-time``, ``gpu-check``, ``doctor``, ``precompile`` and ``cache``.

- ``bench``: compile-time sweep (models x layer counts x modes, a fresh process per cold/warm
  measurement); prints a Markdown table, writes ``results.json`` and PNG plots.
- ``step-time``: steady-state step time of eager, ``layerpass.compile`` and plain Inductor,
  interleaved in one process (``bench/step_time.py``, with its own options).
- ``gpu-check``: every Triton kernel against torch, each fusion's matches, compile cold/warm and
  the steady-state step on a GPU (``bench/gpu_check.py``, with its own options; ``--device cpu``
  anywhere).
- ``doctor``: compiles a zoo model and explains pieces that are equal except for constants;
  exits 1 when it finds such avoidable uniqueness (a CI guard).
- ``precompile``: fills a cache (the local dir, and the remote store if one is set) without
  serving, so every later process loads (``layerpass/precompile.py``).
- ``cache export`` / ``cache import``: a model's programs and pieces as one sealed bundle file, to
  carry a compile to another machine (``backend/cache/bundle.py``).

Exit codes: 0 success, 1 problems found (doctor), rows that failed (bench ``--strict``) or a
bundle that could not be written or had refused entries (cache), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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


def _progress(total: int) -> tuple[Any, Any, Any, Any]:
    """(describe, advance, close, write) callbacks: a tqdm bar on stderr, or plain lines without tqdm."""

    def write_plain(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    try:
        from tqdm import tqdm
    except ImportError:
        done = [0]

        def describe(text: str) -> None:
            print(f"[{done[0]}/{total}] {text}", file=sys.stderr, flush=True)

        def advance(n: int) -> None:
            done[0] += n

        return describe, advance, lambda: None, write_plain
    bar = tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True)
    return bar.set_description, bar.update, bar.close, lambda text: bar.write(text, file=sys.stderr)


def _row_line(row: dict[str, Any]) -> str:
    """One finished row, for the log on stderr."""
    from layerpass.bench.summary import traced_cell

    def sec(v: Any) -> str:
        return "-" if v is None else f"{v:.1f} s"

    text = f"{row['model']} L={row['layers']} {row['mode']}: {row['status']}"
    if row["first_call_s"] is not None:
        text += f", cold {sec(row['first_call_s'])} (dynamo {sec(row['dynamo_s'])}), warm {sec(row['warm_start_s'])}"
    if row["trace"] is not None or row["warm_warm_start"] is not None:
        text += f", traced {traced_cell(row)}, warm path {row['warm_warm_start'] or '-'}"
    return text + (f" ({row['reason']})" if row["reason"] else "")


@dataclass
class Subcommand:
    """A subcommand's parser, what runs it, and the options it declared (in order)."""

    parser: argparse.ArgumentParser
    run: Callable[[argparse.Namespace, Subcommand], int]
    options: list[argparse.Action] = field(default_factory=list)

    def option(self, *flags: str, group: Any = None, **kwargs: Any) -> argparse.Action:
        """``add_argument`` on the parser (or one of its groups), remembering the option."""
        action = (group or self.parser).add_argument(*flags, **kwargs)
        self.options.append(action)
        return action


def _command(args: argparse.Namespace, bench: Subcommand) -> str:
    """The bench command line that gives this sweep (options that differ from their defaults)."""
    import shlex

    parts = ["layerpass", "bench"]
    for action in bench.options:
        value = getattr(args, action.dest)
        if value == action.default or value is None:
            continue
        flag = action.option_strings[-1]
        if action.nargs == 0:  # a switch (store_true)
            parts.append(flag)
        elif action.dest in ("models", "layers", "modes"):
            parts += [flag, ",".join(str(v) for v in _flatten(value) or [])]
        elif action.dest == "imports":
            for name in value:
                parts += [flag, name]
        else:
            parts += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return shlex.join(parts)


def cmd_bench(args: argparse.Namespace, bench: Subcommand) -> int:
    import shutil

    from layerpass.bench import sweep
    from layerpass.bench.config import SweepConfig, check_models
    from layerpass.bench.summary import markdown_table

    preset = "quick" if args.quick else "full" if args.full else "default"
    try:
        models = _flatten(args.models)
        if args.hf_config is not None:  # a Hugging Face config at its real widths, as the zoo name hf-config:PATH
            models = [*(models or []), f"hf-config:{os.path.abspath(args.hf_config)}"]
        cfg = SweepConfig(models=models, layers=_flatten(args.layers), modes=_flatten(args.modes),
                          preset=preset, out_dir=args.out, timeout_s=args.timeout, timeout_scale=args.timeout_scale,
                          repeats=args.repeats, threads=args.threads, jobs=args.jobs, rel_tolerance=args.tolerance,
                          imports=tuple(args.imports), keep_cache=args.keep_cache, command=_command(args, bench))
        check_models(cfg.models, cfg.imports)
    except (ValueError, ImportError) as e:
        bench.parser.error(str(e))
    order = sweep.plan(cfg)
    limits = ", ".join(f"{n} layers {cfg.timeout(n):.0f} s" for n in cfg.layers)
    rows = f"{len(order)} row{'' if len(order) == 1 else 's'}"
    print(f"layerpass bench: {rows} ({cfg.sweep_name} sweep), {cfg.jobs} at a time; time limit per process: "
          f"{limits}; results: {cfg.out_dir}/results.json", file=sys.stderr, flush=True)
    describe, advance, close, write = _progress(2 * len(order))
    try:
        doc = sweep.run_sweep(cfg, describe, advance, on_row=lambda row: write(_row_line(row)))
    finally:
        close()
    table = markdown_table(doc)
    print(table)
    print(f"\nwrote {os.path.join(cfg.out_dir, 'results.json')} and results.md", file=sys.stderr)
    plots: list[str] = []
    if not args.no_plots:
        from layerpass.bench.plots import make_plots

        try:
            plots = make_plots(doc, cfg.out_dir)
            for path in plots:
                print(f"wrote {path}", file=sys.stderr)
        except ImportError as e:
            print(f"layerpass bench: no plots: {e}", file=sys.stderr)
    if args.docs:
        os.makedirs(args.docs, exist_ok=True)
        for path in [os.path.join(cfg.out_dir, "results.md"), *plots]:
            target = os.path.join(args.docs, os.path.basename(path))
            if not os.path.exists(target) or not os.path.samefile(path, target):
                shutil.copyfile(path, target)
            print(f"wrote {target}", file=sys.stderr)
    bad = [r for r in doc["rows"] if r["status"] != "ok"]
    return 1 if args.strict and bad else 0


def cmd_doctor(args: argparse.Namespace, doctor: Subcommand) -> int:
    import importlib

    import torch

    from layerpass.backend.doctor.analysis import diagnose
    from layerpass.models import build_model, make_step, registered_models
    from layerpass.backend.config import CompilationConfig

    for name in args.imports:
        importlib.import_module(name)
    if args.model not in registered_models():
        doctor.parser.error(f"unknown model {args.model!r}; registered models: {', '.join(registered_models())}")
    if args.layers < 1:
        doctor.parser.error(f"--layers must be >= 1, got {args.layers}")
    torch.set_num_threads(args.threads)
    config = CompilationConfig(split=args.split, cache_dir=tempfile.mkdtemp(prefix="layerpass-doctor-"), disable_cache=True)
    model = build_model(args.model, num_layers=args.layers)
    step = make_step(model, num_decodes=2, prefill_lens=[3, 5])
    report = diagnose(model, step.run, compile=not args.no_compile, config=config)
    print(report.format(max_findings=args.max_findings))
    return 0 if report.ok else 1


def _bench(subparsers: Any) -> Subcommand:
    from layerpass.bench.config import DEFAULT_JOBS, TIMEOUT_BASE_S, TIMEOUT_PER_LAYER_S
    from layerpass.bench.measure import MODES

    b = Subcommand(subparsers.add_parser(
        "bench", help="compile-time sweep: models x layers x modes (cold and warm)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compile-time sweep; each cold/warm measurement runs in a fresh process, one at a time.\n\n"
                    "sweeps:\n"
                    "  (default)  llama 2,8,32,80 + llama-fp8 and moe 2,80, layerpass vs inductor;\n"
                    "             llama 2,8 layerpass-str and regional (20 rows, what `make bench` runs;\n"
                    "             about 15-20 minutes on 2 idle cores)\n"
                    "  --quick    llama 2 and 80 layers, layerpass vs inductor (4 rows: every llama acceptance ratio)\n"
                    "  --full     llama,llama-fp8,moe x 2,8,32,80 x all four modes (48 rows)\n"
                    "  --models/--layers/--modes: their product; what is not given comes from the sweep above\n"
                    "             (models llama,llama-fp8,moe, layers 2,8,32,80, modes layerpass,inductor;\n"
                    "             --quick: llama, 2,80; --full: all four modes)\n\n"
                    "No sweep budget: every row is measured however slow the machine. Each process has a\n"
                    f"time limit only a hung one should reach: {TIMEOUT_BASE_S:.0f} s + {TIMEOUT_PER_LAYER_S:.0f} s per layer "
                    "(--timeout-scale multiplies it; --timeout fixes it).\n"
                    "Prints a Markdown table (with the acceptance ratios); writes results.json and results.md\n"
                    "after every row, and PNG plots at the end."), cmd_bench)
    size = b.parser.add_mutually_exclusive_group()
    b.option("--quick", group=size, action="store_true",
             help="llama, 2 and 80 layers, layerpass vs inductor: the depth-free claim and every llama "
                  "acceptance ratio in 4 rows (about 5 minutes on 2 idle cores)")
    b.option("--full", group=size, action="store_true",
             help="every model (llama,llama-fp8,moe) x 2,8,32,80 layers x all four modes (48 rows; an hour "
                  "or more on 2 cores)")
    b.option("--models", type=_csv(str), action="append",
             help="comma-separated zoo models (custom sweep; default: llama,llama-fp8,moe)")
    b.option("--hf-config", metavar="PATH", default=None,
             help="also (or, without --models, only) the Hugging Face model of this config.json or checkpoint "
                  "directory, random weights at its real widths, --layers decoder layers (row name hf-config:PATH)")
    b.option("--layers", type=_csv(int), action="append",
             help="comma-separated layer counts (custom sweep; default: 2,8,32,80)")
    b.option("--modes", type=_csv(str), action="append",
             help=f"comma-separated modes (custom sweep; default: layerpass,inductor; any of {','.join(MODES)})")
    b.option("--out", default="bench-results", help="output directory (default: bench-results)")
    b.option("--docs", metavar="DIR", default=None, help="also copy results.md and the plots into DIR (e.g. docs)")
    b.option("--jobs", type=int, default=DEFAULT_JOBS,
             help=f"measurements at once, each single-threaded (default {DEFAULT_JOBS}: they never compete for "
                  "the cores; more is faster but noisier)")
    b.option("--timeout", type=float, default=None, metavar="SECONDS",
             help=f"fixed time limit per measurement process (default: scaled to size, {TIMEOUT_BASE_S:.0f} s + "
                  f"{TIMEOUT_PER_LAYER_S:.0f} s per layer: {TIMEOUT_BASE_S + 2 * TIMEOUT_PER_LAYER_S:.0f} s at 2 layers, "
                  f"{TIMEOUT_BASE_S + 80 * TIMEOUT_PER_LAYER_S:.0f} s at 80); a (model, mode) that times out "
                  "skips its larger layer counts")
    b.option("--timeout-scale", type=float, default=1.0, metavar="FACTOR",
             help="multiply the scaled default time limit (a much slower machine; default 1)")
    b.option("--repeats", type=int, default=20, help="steady-state steps timed per row (median; default 20)")
    b.option("--threads", type=int, default=1, help="torch/OpenMP threads in each measurement (default 1)")
    b.option("--tolerance", type=float, default=0.05,
             help="max abs error vs eager allowed, relative to max(1, max |logits|) (default 0.05)")
    b.option("--import", dest="imports", action="append", default=[], metavar="MODULE",
             help="import MODULE first (it registers extra models); repeatable")
    b.option("--no-plots", action="store_true", help="skip the PNG plots")
    b.option("--keep-cache", action="store_true", help="keep the per-measurement cache directories")
    b.option("--strict", action="store_true", help="exit 1 if any row is not ok")
    return b


def _doctor(subparsers: Any) -> Subcommand:
    d = Subcommand(subparsers.add_parser(
        "doctor", help="explain compiled pieces that differ only in constants",
        description="Compile a zoo model through the layerpass backend and explain pieces that are "
                    "equal except for constants; exit 1 if there are any."), cmd_doctor)
    d.option("--model", required=True, help="zoo model name (e.g. moe)")
    d.option("--layers", type=int, default=4, help="decoder layers (default 4)")
    d.option("--split", choices=("layers", "ops"), default="layers", help="backend split mode (default layers)")
    d.option("--no-compile", action="store_true",
             help="split and hash like the backend but skip Inductor (seconds instead of minutes)")
    d.option("--max-findings", type=int, default=5, help="findings printed in full (default 5)")
    d.option("--threads", type=int, default=1, help="torch threads (default 1)")
    d.option("--import", dest="imports", action="append", default=[], metavar="MODULE",
             help="import MODULE first (it registers extra models); repeatable")
    return d


def _fleet_config(args: argparse.Namespace) -> Any:
    from layerpass.backend.config import CompilationConfig

    return CompilationConfig(cache_dir=args.cache_dir, remote_cache=getattr(args, "remote_cache", None))


def _model_options(sub: Subcommand) -> None:
    sub.option("--layers", type=int, required=True, help="decoder layers (as the served model has)")
    sub.option("--cache-dir", default=None, help="the cache dir (default $LAYERPASS_CACHE_DIR or ~/.cache/layerpass)")


def _check_model(sub: Subcommand, name: str, layers: int) -> None:
    from layerpass.models import registered_models

    if not name.startswith("hf-config:") and name not in registered_models():
        sub.parser.error(f"unknown model {name!r}; a zoo name ({', '.join(registered_models())}) or hf-config:PATH")
    if layers < 1:
        sub.parser.error(f"--layers must be >= 1, got {layers}")


def cmd_precompile(args: argparse.Namespace, sub: Subcommand) -> int:
    import torch

    from layerpass.precompile import run_serving_steps

    _check_model(sub, args.model, args.layers)
    torch.set_num_threads(args.threads)
    config = _fleet_config(args)
    done = run_serving_steps(args.model, args.layers, config)
    s = done.summary()
    print(f"layerpass precompile: {args.model}, {args.layers} layers, cache {config.cache_dir}"
          f"{' + ' + config.remote_cache if config.remote_cache else ''}: pieces {s['pieces']}, "
          f"warm start {s['warm_start']}, traced {s['trace']} ({s['regions']} regions)")
    return 0


def _precompile(subparsers: Any) -> Subcommand:
    p = Subcommand(subparsers.add_parser(
        "precompile", help="fill a cache (local dir and remote store) without serving",
        description="Compile a model's serving steps (a mixed step and a one-token decode) through "
                    "layerpass.compile so that every later process on this cache, or on the remote store, "
                    "loads them instead of tracing or compiling."), cmd_precompile)
    p.option("model", help="zoo model name (llama, moe, ...) or hf-config:PATH")
    _model_options(p)
    p.option("--remote-cache", default=None, metavar="URL",
             help="redis://HOST:PORT/DB to fill too (default $LAYERPASS_REMOTE_CACHE; needs $LAYERPASS_CACHE_SECRET)")
    p.option("--threads", type=int, default=1, help="torch threads (default 1)")
    return p


def cmd_cache(args: argparse.Namespace, sub: Subcommand) -> int:
    from layerpass.backend.cache.bundle import BundleError, export_bundle, import_bundle
    from layerpass.backend.cache.location import CacheLocation
    from layerpass.backend.config import CompilationConfig
    from layerpass.envs import cache_secret

    try:
        if args.action == "export":
            from layerpass.backend.cache.bundle import all_names, bundle_names
            from layerpass.precompile import program_store

            if args.output is None or not (args.all or (args.model is not None and args.layers is not None)):
                sub.parser.error("cache export needs -o/--output and either --model and --layers, or --all")
            config = CompilationConfig(cache_dir=args.cache_dir)
            if args.all:
                location = CacheLocation(config.cache_dir)  # type: ignore[arg-type]
                names = all_names(location)
            else:
                _check_model(sub, args.model, args.layers)
                store = program_store(args.model, args.layers, config)
                location, names = store.location, bundle_names(store)
            report = export_bundle(location, names, args.output, cache_secret())
            print(f"layerpass cache export: {report.files} files ({report.bytes / 1e6:.1f} MB) -> {args.output}")
            return 0
        if args.bundle is None:
            sub.parser.error("cache import needs the bundle file")
        location = CacheLocation(CompilationConfig(cache_dir=args.cache_dir).cache_dir)  # type: ignore[arg-type]
        report = import_bundle(args.bundle, location, cache_secret())
        print(f"layerpass cache import: {report.files} files into {location.root}"
              + (f"; refused {len(report.refused)}: {'; '.join(report.refused[:3])}" if report.refused else ""))
        return 1 if report.refused else 0
    except BundleError as e:
        print(f"layerpass cache {args.action}: {e}", file=sys.stderr)
        return 1


def _cache(subparsers: Any) -> Subcommand:
    c = Subcommand(subparsers.add_parser(
        "cache", help="move a model's compile between machines: export / import a sealed bundle",
        description="export: a model's saved programs and compiled pieces, each sealed with "
                    "$LAYERPASS_CACHE_SECRET, into one tar file; import: verify and add a bundle's entries to "
                    "a cache dir (refused entries are named; exit 1 if any)."), cmd_cache)
    c.option("action", choices=("export", "import"))
    c.option("bundle", nargs="?", default=None, help="import: the bundle file")
    c.option("--model", default=None, help="export: zoo model name or hf-config:PATH")
    c.option("--layers", type=int, default=None, help="export: decoder layers")
    c.option("--all", action="store_true",
             help="export: every entry of the cache dir (e.g. a tensor-parallel model's, keyed by its shards)")
    c.option("-o", "--output", default=None, help="export: the bundle file to write")
    c.option("--cache-dir", default=None, help="the cache dir (default $LAYERPASS_CACHE_DIR or ~/.cache/layerpass)")
    return c


def _pass_through(subparsers: Any, name: str, module: str, help: str) -> Subcommand:
    """A subcommand whose options are ``layerpass.bench.<module>``'s own (``layerpass <name> --help``
    prints them): the rest of the command line is passed on whole to its ``main``."""
    def run(args: argparse.Namespace, _: Subcommand) -> int:
        import importlib

        return importlib.import_module(f"layerpass.bench.{module}").main(args.passed_args)

    return Subcommand(subparsers.add_parser(name, add_help=False, help=help), run)


# subcommands whose own parser reads the rest of the command line
PASS_THROUGH = ("step-time", "gpu-check")


def build_cli() -> tuple[argparse.ArgumentParser, dict[str, Subcommand]]:
    """The ``layerpass`` parser and its subcommands by name (kept here, not read back from argparse)."""
    parser = argparse.ArgumentParser(prog="layerpass", description="layerpass: compile-time benchmarks and diagnostics")
    subparsers = parser.add_subparsers(dest="command", required=True,
                                       metavar="{bench,step-time,gpu-check,doctor,precompile,cache}")
    step_time = _pass_through(subparsers, "step-time", "step_time", "steady-state step time: eager vs "
                              "layerpass.compile vs plain Inductor, interleaved in one process")
    gpu_check = _pass_through(subparsers, "gpu-check", "gpu_check", "Triton kernels vs torch, fusions, compile "
                              "cold/warm and the step on a GPU (--device cpu anywhere)")
    return parser, {"bench": _bench(subparsers), "step-time": step_time, "gpu-check": gpu_check,
                    "doctor": _doctor(subparsers), "precompile": _precompile(subparsers), "cache": _cache(subparsers)}


def main(argv: Sequence[str] | None = None) -> int:
    parser, subcommands = build_cli()
    args, rest = parser.parse_known_args(argv)
    if args.command in PASS_THROUGH:
        args.passed_args = rest  # the subcommand's own parser reads (and reports) them
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    command = subcommands[args.command]
    return int(command.run(args, command))  # the subcommand's parser reports its usage errors


if __name__ == "__main__":
    sys.exit(main())
