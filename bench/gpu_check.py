"""``layerpass gpu-check``: what layerpass does on a GPU, in one command and one table.

    pip install --no-deps --no-build-isolation -e . && layerpass gpu-check      # on the GPU machine
    layerpass gpu-check --device cpu                                            # anywhere: Triton interpreter, tiny

It needs only torch, triton and transformers (for the Llama-3.2-1B widths), downloads nothing and
keeps to a time budget (``--budget-s``, default 420 s on CUDA, so it ends well inside 8 minutes on one
H100): a check that would start after the budget is spent is a row marked skipped, with why.
Sections, each a group of rows:

- ``kernel``: every Triton kernel (``bench/kernels.py``'s cases) against its torch reference, in
  bf16 and fp16 (the ``+fp8`` cases only where the chip has FP8: sm_89 or newer, or the
  interpreter), with torch and Triton times on CUDA;
- ``fusion``: each fusion's matches on the device, from the cold ``layerpass.compile`` of
  llama-fp8, moe and moe-fp8 (ok when it covers every layer of a model);
- ``compile``: ``layerpass.compile`` and plain Inductor, cold and warm (fresh processes on new
  caches, ``bench/runner.py``), for llama-fp8 at 8 layers and Llama-3.2-1B widths
  (``bench/configs/llama-3.2-1b.json``);
- ``step``: the steady-state step of eager, ``layerpass.compile`` and Inductor, interleaved in
  one process, and both with CUDA graphs over the pieces Inductor can capture (CUDA only).

Writes ``gpu_check.json`` (every row) and ``gpu_check.md`` (the table) in ``--out`` and prints
the table. Exit 0 when no row failed, 1 otherwise. ``--device cpu`` shrinks every case (the
suite runs it, ``tests/bench/test_gpu_check.py``); its timings are not measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

CONFIG_1B = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "llama-3.2-1b.json")
KERNEL_DTYPES = ("bf16", "fp16")
FUSION_MODELS = ("llama-fp8", "moe", "moe-fp8")  # moe: the shared-expert fusion; moe-fp8: its quantised input
FP8_MIN_CAPABILITY = (8, 9)  # e4m3 on Ada / Hopper and newer


@dataclass
class Row:
    section: str
    check: str
    status: str  # "ok", "FAIL" or "skipped"
    result: str = ""  # the figures, in words
    why: str = ""  # for "skipped" and "FAIL"
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    """What to run on ``device``: real sizes on CUDA, tiny ones on CPU."""

    device: str
    budget_s: float
    compile_cases: tuple[tuple[str, int], ...]
    step_cases: tuple[tuple[str, int], ...]
    model_dtype: str | None  # None: the zoo model's own (fp32)
    repeats: int
    tiny_kernels: bool
    fusion_layers: int

    @classmethod
    def for_device(cls, device: str, budget_s: float, repeats: int | None) -> "Plan":
        if device == "cuda":
            return cls(device, budget_s, (("llama-fp8", 8), (f"hf-config:{CONFIG_1B}", 4)),
                       (("llama-fp8", 8), (f"hf-config:{CONFIG_1B}", 4)), "bf16", repeats or 30, False, 8)
        return cls(device, budget_s, (("llama-fp8", 2),), (("llama-fp8", 2),), None, repeats or 3, True, 2)


class Clock:
    """The budget: ``left()`` seconds remain; ``spent()`` says why a check is skipped."""

    def __init__(self, budget_s: float) -> None:
        self.start, self.budget_s = time.perf_counter(), budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def spent(self) -> str | None:
        return f"the time budget (--budget-s {self.budget_s:.0f}) was spent" if self.left() <= 0 else None


def short(exc: BaseException) -> str:
    """An exception in one line short enough for a table cell."""
    from .measure import _reason

    return _reason(exc)


# ---------------------------------------------------------------- kernels
def fp8_unavailable(device: str) -> str | None:
    """Why this chip cannot run the FP8 cases (None: it can)."""
    if device != "cuda":
        return None  # the interpreter emulates e4m3
    cap = torch.cuda.get_device_capability()
    if cap < FP8_MIN_CAPABILITY:
        return f"{torch.cuda.get_device_name()} is sm_{cap[0]}{cap[1]}: FP8 e4m3 needs sm_89 or newer"
    return None


def close_enough(name: str, dtype: str, diff: float, ref_max: float) -> bool:
    """Triton vs torch within the dtype's rounding: a few ulps of bf16/fp16, one FP8 grid step
    (1/8 relative for e4m3) for the quantised outputs."""
    rel = 0.13 if "fp8" in name else {"bf16": 0.04, "fp16": 0.01}[dtype]
    return diff <= rel * max(ref_max, 1.0)


@contextmanager
def kernel_env(device: str) -> Iterator[None]:
    """On CPU, the Triton interpreter while the kernel section runs (the kernel modules must not
    have been imported for a GPU before); nothing on CUDA."""
    if device == "cuda":
        yield
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        from triton.runtime.interpreter import InterpretedFunction

        from layerpass.ops.triton import attention

        if not isinstance(attention._paged_attention_kernel, InterpretedFunction):
            raise RuntimeError("the kernel modules were imported before TRITON_INTERPRET=1 was set; run in a fresh process")
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def check_kernels(plan: Plan, clock: Clock) -> list[Row]:
    from .kernels import DTYPES, _as_float, build_cases, time_ms

    from layerpass.ops.triton import interpreter_unusable

    unusable = interpreter_unusable() if plan.device == "cpu" else None
    if unusable:
        return [Row("kernel", f"all ({dtype})", "skipped", why=unusable) for dtype in KERNEL_DTYPES]
    rows: list[Row] = []
    no_fp8 = fp8_unavailable(plan.device)
    with kernel_env(plan.device):
        for dtype in KERNEL_DTYPES:
            try:
                cases = build_cases(plan.device, DTYPES[dtype], plan.tiny_kernels)
            except Exception as e:  # a failure to build the inputs fails the dtype's rows, not the check
                rows.append(Row("kernel", f"all ({dtype})", "FAIL", why=short(e)))
                continue
            for case in cases:
                check = f"{case.name} ({dtype}) {case.shape}"
                why = clock.spent() or (no_fp8 if "fp8" in case.name else None)
                if why:
                    rows.append(Row("kernel", check, "skipped", why=why))
                    continue
                try:
                    ref, out = _as_float(case.torch_fn()), _as_float(case.triton_fn())
                    diff, ref_max = float((ref - out).abs().max()), float(ref.abs().max())
                    figures = {"max_abs_diff": diff, "ref_max_abs": ref_max}
                    result = f"max abs diff {diff:.3g} (max abs ref {ref_max:.3g})"
                    if plan.device == "cuda":
                        figures["torch_ms"], figures["triton_ms"] = time_ms(case.torch_fn, "cuda"), time_ms(case.triton_fn, "cuda")
                        result += f"; torch {figures['torch_ms']:.3f} ms, triton {figures['triton_ms']:.3f} ms"
                    ok = close_enough(case.name, dtype, diff, ref_max)
                    rows.append(Row("kernel", check, "ok" if ok else "FAIL", result,
                                    "" if ok else "Triton and torch disagree beyond the dtype's rounding", figures))
                except Exception as e:
                    rows.append(Row("kernel", check, "FAIL", why=short(e)))
    return rows


# ---------------------------------------------------------------- compile (cold / warm, fresh processes)
def fresh_pair(model: str, layers: int, mode: str, plan: Plan, clock: Clock,
               phases: tuple[str, ...] = ("cold", "warm")) -> tuple[dict | None, dict | None, str]:
    """The cold and the warm ``bench.measure`` rows of (model, layers, mode) on new caches (None
    for a phase not run), and why not all of them ran ("" if they did)."""
    from .runner import FreshRunError, fresh_cache_dirs, run_fresh

    args = ["-m", "layerpass.bench.measure", "--model", model, "--layers", str(layers), "--mode", mode,
            "--device", plan.device, "--repeats", str(plan.repeats)]
    if plan.model_dtype:
        args += ["--dtype", plan.model_dtype]
    results: list[dict | None] = [None, None]
    with fresh_cache_dirs() as caches:
        for i, phase in enumerate(phases):
            if clock.spent():
                return results[0], results[1], f"{phase}: {clock.spent()}"
            limit = max(30.0, min(300.0, clock.left()))
            run = run_fresh([*args, "--phase", phase], caches, use_layername=True, timeout_s=limit)
            try:
                results[i] = run.require(f"{mode} {phase}", limit)
            except FreshRunError as e:
                return results[0], results[1], e.reason
    return results[0], results[1], ""


def label(model: str, layers: int) -> str:
    name = "Llama-3.2-1B widths" if model == f"hf-config:{CONFIG_1B}" else model
    return f"{name} x{layers}"


def check_compile(plan: Plan, clock: Clock) -> tuple[list[Row], dict[str, dict]]:
    """Rows per (model, mode), and the cold layerpass rows by model (their fusion counts)."""
    rows: list[Row] = []
    cold_layerpass: dict[str, dict] = {}
    cases = list(plan.compile_cases)
    if plan.device != "cuda":
        rows.append(Row("compile", f"{label(f'hf-config:{CONFIG_1B}', 4)}: layerpass, inductor", "skipped",
                        why="--device cpu: a GPU-sized model (LM head 128256 x 2048); CUDA runs it"))
    for model, layers in cases:
        first: dict[str, float] = {}
        for mode in ("layerpass", "inductor"):
            cold, warm, why = fresh_pair(model, layers, mode, plan, clock)
            check = f"{label(model, layers)}: {mode} cold / warm"
            if cold is not None and mode == "layerpass":
                cold_layerpass[model] = cold
            bad = [r for r in (cold, warm) if r is not None and r.get("status") != "ok"]
            if bad:
                why = bad[0].get("reason", "failed")
            if why:
                rows.append(Row("compile", check, "skipped" if "budget" in why else "FAIL", why=why))
                continue
            first[mode] = cold["first_call_s"]
            figures = {"cold_s": cold["first_call_s"], "warm_s": warm["first_call_s"],
                       "max_abs_err": max(cold["max_abs_err"], warm["max_abs_err"]), "ref_max_abs": cold["ref_max_abs"]}
            result = f"first call cold {figures['cold_s']:.1f} s, warm {figures['warm_s']:.1f} s"
            if mode == "layerpass":
                figures.update({"trace": cold.get("trace"), "warm_start": warm.get("warm_start")})
                result += f"; {cold.get('trace')}, warm start {warm.get('warm_start')}"
            if "layerpass" in first and mode == "inductor":
                figures["inductor_over_layerpass_cold"] = first["inductor"] / first["layerpass"]
                result += f"; inductor / layerpass cold {figures['inductor_over_layerpass_cold']:.2f}"
            tol = 0.05 * max(1.0, figures["ref_max_abs"])
            ok = figures["max_abs_err"] <= tol and (mode != "layerpass" or warm.get("warm_start") == "loaded")
            rows.append(Row("compile", check, "ok" if ok else "FAIL", result,
                            "" if ok else f"max abs err {figures['max_abs_err']:.3g} (allowed {tol:.3g}) or no warm start",
                            figures))
    return rows, cold_layerpass


# ---------------------------------------------------------------- fusions
def fusion_names() -> list[str]:
    """Every fusion the default pass list runs (its pattern passes' names)."""
    from layerpass.backend.config import CompilationConfig
    from layerpass.backend.pieces.pass_list import configure
    from layerpass.passes.pattern_pass import PatternPass

    return [p.name for p in configure(CompilationConfig()) if isinstance(p, PatternPass)]


def check_fusions(plan: Plan, clock: Clock, cold_layerpass: dict[str, dict]) -> list[Row]:
    for model in FUSION_MODELS:
        if model not in cold_layerpass:
            if clock.spent():
                break
            cold, _, why = fresh_pair(model, plan.fusion_layers, "layerpass", plan, clock, phases=("cold",))
            cold_layerpass[model] = cold if cold is not None else {"status": "failed", "reason": why}
    not_run = [f"{m} did not compile: {clock.spent()}" for m in FUSION_MODELS if m not in cold_layerpass]
    counts: dict[str, dict[str, int]] = {}
    layers_of: dict[str, int] = {}
    problems: list[str] = list(not_run)
    for model, row in cold_layerpass.items():
        if row.get("status") != "ok":
            problems.append(f"{model}: {row.get('reason', 'failed')}")
            continue
        layers_of[model] = row["layers"]
        for name, n in (row.get("fusion_matches") or {}).items():
            counts.setdefault(name, {})[model] = int(n)
    rows = []
    for name in fusion_names():
        per_model = counts.get(name, {})
        result = ", ".join(f"{m} x{layers_of[m]}: {n}" for m, n in sorted(per_model.items()))
        if any(n >= layers_of[m] for m, n in per_model.items()):
            rows.append(Row("fusion", name, "ok", result or "-", figures=per_model))
        elif not layers_of:
            rows.append(Row("fusion", name, "skipped" if clock.spent() else "FAIL",
                            why="; ".join(problems) or clock.spent() or "no compile ran"))
        elif not_run:  # the model that would show it was not reached
            rows.append(Row("fusion", name, "skipped", result, why="; ".join(not_run), figures=per_model))
        else:
            rows.append(Row("fusion", name, "FAIL", result or "0 matches",
                            f"matched fewer times than a model has layers ({', '.join(f'{m} x{n}' for m, n in layers_of.items())})",
                            per_model))
    return rows


# ---------------------------------------------------------------- steady-state step
def step_modes(device: str, tokens: int) -> dict[str, Callable[[Any], Any] | str]:
    """Mode -> how to compile the model, or why the mode is skipped here."""
    import tempfile

    import layerpass

    def lp(**options: Any) -> Callable[[Any], Any]:
        return lambda m: layerpass.compile(m, layerpass.CompilationConfig(
            cache_dir=tempfile.mkdtemp(prefix="layerpass-gpu-check-"), **options))

    no_graphs = None if device == "cuda" else "CUDA graphs need a CUDA device"
    return {
        "eager": lambda m: m,
        "layerpass": lp(),
        "inductor": lambda m: torch.compile(m, backend="inductor", dynamic=True),
        # static-shape pieces for this step's token count: what CUDA graphs can capture
        "layerpass+cudagraphs": no_graphs or lp(compile_sizes=(tokens,), inductor_options={"triton.cudagraphs": True}),
        "inductor+cudagraphs": no_graphs or (lambda m: torch.compile(m, mode="reduce-overhead", dynamic=False)),
    }


def cudagraph_skips() -> int:
    """Graphs Inductor compiled for CUDA graphs but ran without them (its counter)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def check_steps(plan: Plan, clock: Clock) -> list[Row]:
    from .case import build_case
    from .kernels import DTYPES
    from .measure import _timed_steps, synced

    rows: list[Row] = []
    sync = synced(plan.device)
    if plan.device != "cuda":
        rows.append(Row("step", f"{label(f'hf-config:{CONFIG_1B}', 4)}: all modes", "skipped",
                        why="--device cpu: a GPU-sized model; CUDA runs it"))
    for model_name, layers in plan.step_cases:
        if clock.spent():
            rows.append(Row("step", f"{label(model_name, layers)}: all modes", "skipped", why=clock.spent()))
            continue
        try:
            model, step = build_case(model_name, layers, device=plan.device, num_decodes=8, prefill_lens=(32, 16),
                                     dtype=None if plan.model_dtype is None else DTYPES[plan.model_dtype])
        except Exception as e:
            rows.append(Row("step", f"{label(model_name, layers)}: all modes", "FAIL", why=short(e)))
            continue
        tokens = int(step.input_ids.shape[0])
        by_mode: dict[str, Row] = {}  # the rows in mode order, measured or not
        fns: dict[str, Any] = {}
        outs: dict[str, torch.Tensor] = {}
        skips: dict[str, int] = {}
        for mode, build in step_modes(plan.device, tokens).items():
            check = f"{label(model_name, layers)}: {mode}"
            why = build if isinstance(build, str) else clock.spent()
            if why:
                by_mode[mode] = Row("step", check, "skipped", why=why)
                continue
            try:
                before = cudagraph_skips()
                fn = build(model)
                for _ in range(3):  # first call compiles; CUDA graphs record on the later ones
                    outs[mode] = step.run(fn)
                sync()
                fns[mode], skips[mode] = fn, cudagraph_skips() - before
            except Exception as e:
                by_mode[mode] = Row("step", check, "FAIL", why=short(e))
        ms = {m: median for m, (median, _) in _timed_steps(step, fns, plan.repeats, plan.device).items()}
        ref = outs.get("eager")
        for mode in fns:
            err = float((outs[mode].float() - ref.float()).abs().max()) if ref is not None else float("nan")
            tol = 0.05 * max(1.0, float(ref.float().abs().max())) if ref is not None else 0.0
            figures = {"ms": ms[mode], "max_abs_err": err, "tokens": tokens}
            result = f"{ms[mode]:.3f} ms ({tokens} tokens)"
            for base in ("eager", "inductor"):
                if base in ms and mode != base:
                    figures[f"vs_{base}"] = ms[mode] / ms[base]
                    result += f"; / {base} {figures[f'vs_{base}']:.2f}"
            if mode.endswith("cudagraphs"):
                figures["cudagraph_skips"] = skips[mode]
                result += f"; pieces Inductor did not capture: {skips[mode]}"
            ok = err <= tol
            by_mode[mode] = Row("step", f"{label(model_name, layers)}: {mode}", "ok" if ok else "FAIL", result,
                                "" if ok else f"max abs err vs eager {err:.3g} (allowed {tol:.3g})", figures)
        rows += [by_mode[m] for m in step_modes(plan.device, tokens) if m in by_mode]
        step.release()
    return rows


# ---------------------------------------------------------------- the table
def markdown(rows: Sequence[Row], header: str) -> str:
    lines = [header, "", "| section | check | status | result |", "| --- | --- | --- | --- |"]
    for r in rows:
        text = r.result if r.status == "ok" else " ".join(x for x in (r.result, f"({r.why})" if r.why else "") if x)
        lines.append(f"| {r.section} | {r.check} | {r.status} | {text.replace('|', '/')} |")
    counts = {s: sum(r.status == s for r in rows) for s in ("ok", "FAIL", "skipped")}
    lines += ["", f"{len(rows)} rows: {counts['ok']} ok, {counts['FAIL']} failed, {counts['skipped']} skipped."]
    return "\n".join(lines)


def environment(device: str) -> dict[str, Any]:
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    env = {"torch": torch.__version__, "triton": version("triton"), "transformers": version("transformers"),
           "device": device}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["capability"] = "sm_%d%d" % torch.cuda.get_device_capability()
    return env


def run(plan: Plan, sections: Sequence[str]) -> list[Row]:
    clock = Clock(plan.budget_s)
    rows: list[Row] = []
    cold_layerpass: dict[str, dict] = {}
    if "kernel" in sections:
        rows += check_kernels(plan, clock)
    if "compile" in sections:
        compile_rows, cold_layerpass = check_compile(plan, clock)
        rows += compile_rows
    if "fusion" in sections:
        rows += check_fusions(plan, clock, cold_layerpass)
    if "step" in sections:
        rows += check_steps(plan, clock)
    return rows


SECTIONS = ("kernel", "compile", "fusion", "step")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="layerpass gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (default) or cpu: tiny cases, kernels under the Triton interpreter")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds after which the remaining checks are skipped (default 420 on CUDA: inside 8 "
                        "minutes on one H100; 1800 on CPU, a shared CI machine)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    p.add_argument("--repeats", type=int, default=None, help="steps timed per mode (default 30 on CUDA, 3 on CPU)")
    p.add_argument("--out", default="gpu-check-results", help="directory for gpu_check.json and gpu_check.md")
    args = p.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        p.error(f"--sections: unknown {unknown}; allowed: {', '.join(SECTIONS)}")
    if args.budget_s is None:
        args.budget_s = 420.0 if args.device == "cuda" else 1800.0
    if args.budget_s <= 0 or (args.repeats is not None and args.repeats < 1):
        p.error("--budget-s must be > 0 and --repeats >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("layerpass gpu-check: no CUDA device here; `layerpass gpu-check --device cpu` runs the same checks "
              "on tiny cases under the Triton interpreter", file=sys.stderr)
        return 2
    if args.device == "cpu":
        torch.set_num_threads(1)  # a shared CI machine
    plan = Plan.for_device(args.device, args.budget_s, args.repeats)
    start = time.perf_counter()
    rows = run(plan, sections)
    env = environment(args.device)
    wall = time.perf_counter() - start
    header = (f"layerpass gpu-check on {env.get('gpu', 'cpu (Triton interpreter, tiny cases)')}: torch {env['torch']}, "
              f"triton {env['triton']}, transformers {env['transformers']}; {wall:.0f} s. "
              f"Command: `layerpass gpu-check {' '.join(argv if argv is not None else sys.argv[1:])}`")
    table = markdown(rows, header)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump({"environment": env, "wall_s": wall, "plan": asdict(plan), "rows": [asdict(r) for r in rows]},
                  f, indent=1, default=str)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 1 if any(r.status == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
