"""The sweep driver: models x layer counts x modes, one fresh process per measurement.

For every (model, layers, mode) it creates two empty temporary directories (the layerpass
artifact cache and ``TORCHINDUCTOR_CACHE_DIR``), runs ``bench/measure.py`` cold in a new
process, then warm in another new process on the same directories, and merges both into one
row (schema: ``ROW_FIELDS`` below and ``bench/README.md``). Every row is written to
``results.json`` as soon as it is known, so an interrupted sweep keeps what it measured.

Wall-clock promises (``--quick`` < 2 min, the default sweep < 15 min on 2 cores) are kept by a
sweep budget: each measurement's timeout is capped by what is left, a (model, mode) that timed
out skips its larger layer counts, and rows that no longer fit are recorded as ``skipped``.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .measure import MODES, ROW_PREFIX

SCHEMA_VERSION = 1
DEFAULT_MODELS = ("llama", "llama-fp8", "moe")
DEFAULT_LAYERS = (2, 8, 32, 80)
QUICK_MODELS = ("llama",)
QUICK_LAYERS = (2, 8)
DEFAULT_BUDGET_S = 14.5 * 60
QUICK_BUDGET_S = 100.0  # + imports and plots: under 2 minutes
# Each measurement is single-threaded (one torch/OpenMP thread, one Inductor compile thread), so
# two at once use a 2-core machine fully; --jobs 1 gives the quietest timings.
DEFAULT_JOBS = max(1, min(2, os.cpu_count() or 1))
DEFAULT_TIMEOUT_S = 240.0
MIN_SLOT_S = 10.0  # less time than this left: skip instead of starting a doomed process
STATUSES = ("ok", "mismatch", "failed", "timeout", "skipped")

_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_OPT_INT = (int, type(None))
_OPT_STR = (str, type(None))
_OPT_DICT = (dict, type(None))
# Every row has exactly these keys; ``None`` where a figure was not measured (see bench/README.md).
ROW_FIELDS: dict[str, tuple[type, ...]] = {
    "model": (str,), "layers": (int,), "mode": (str,), "status": (str,), "reason": _OPT_STR,
    "cold_status": _OPT_STR, "warm_status": _OPT_STR,
    "dynamo_s": _OPT_NUM, "compile_s": _OPT_NUM, "first_call_s": _OPT_NUM,
    "warm_start_s": _OPT_NUM, "warm_compile_s": _OPT_NUM,
    "pieces": _OPT_INT, "unique_pieces": _OPT_INT, "compiled_pieces": _OPT_INT,
    "warm_compiled_pieces": _OPT_INT, "warm_cache_hits": _OPT_INT,
    "fusion_matches": _OPT_DICT, "fusion_matches_total": _OPT_INT,
    "max_abs_err": _OPT_NUM, "warm_max_abs_err": _OPT_NUM, "ref_max_abs": _OPT_NUM, "tolerance": _OPT_NUM,
    "step_ms_compiled": _OPT_NUM, "step_ms_eager": _OPT_NUM, "step_speedup": _OPT_NUM,
    "step_ms_compiled_min": _OPT_NUM, "step_ms_eager_min": _OPT_NUM, "repeats": _OPT_INT,
    "cold_wall_s": _OPT_NUM, "warm_wall_s": _OPT_NUM, "timeout_s": _OPT_NUM,
}
DOC_FIELDS = ("schema_version", "created", "machine", "config", "wall_s", "rows")


@dataclass
class SweepConfig:
    models: tuple[str, ...] = DEFAULT_MODELS
    layers: tuple[int, ...] = DEFAULT_LAYERS
    modes: tuple[str, ...] = MODES
    out_dir: str = "bench-results"
    timeout_s: float = DEFAULT_TIMEOUT_S  # per process (cold or warm)
    budget_s: float | None = DEFAULT_BUDGET_S  # whole sweep; None: unlimited
    repeats: int = 20
    threads: int = 1
    jobs: int = 1  # measurements run at once (the CLI defaults to DEFAULT_JOBS)
    rel_tolerance: float = 0.05  # max_abs_err allowed, relative to max(1, max |eager logits|)
    imports: tuple[str, ...] = ()
    quick: bool = False
    keep_cache: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad_modes = [m for m in self.modes if m not in MODES]
        if bad_modes or not self.modes:
            raise ValueError(f"unknown or no modes {bad_modes or list(self.modes)}; allowed: {', '.join(MODES)}")
        if not self.layers or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in self.layers):
            raise ValueError(f"layer counts must be positive ints, got {list(self.layers)}")
        if not self.models:
            raise ValueError("no models given")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout_s}")
        if self.budget_s is not None and self.budget_s <= 0:
            raise ValueError(f"budget must be > 0 seconds (or None for unlimited), got {self.budget_s}")
        if self.repeats < 1 or self.threads < 1 or self.jobs < 1:
            raise ValueError(f"repeats, threads and jobs must be >= 1, got {self.repeats}, {self.threads}, {self.jobs}")


def check_models(models: Sequence[str], imports: Sequence[str] = ()) -> None:
    """Fail early, naming the registered models, if a requested one is not in the zoo."""
    import importlib

    from layerpass.models import registered_models

    for name in imports:
        importlib.import_module(name)
    known = registered_models()
    unknown = [m for m in models if m not in known]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; registered models: {', '.join(known)}")


def machine_info() -> dict[str, Any]:
    import torch

    import layerpass

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "layerpass": layerpass.__version__, "cuda": torch.cuda.is_available(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def plan(cfg: SweepConfig) -> list[tuple[str, int, str]]:
    """Small layer counts first: if the budget runs out, the big (slowest) rows are the ones skipped."""
    return [(model, n, mode) for n in sorted(set(cfg.layers)) for model in cfg.models for mode in cfg.modes]


def _env(cfg: SweepConfig, mode: str, cache: str, inductor_cache: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(cfg.extra_env)
    env.update({
        "LAYERPASS_CACHE_DIR": cache, "TORCHINDUCTOR_CACHE_DIR": inductor_cache,
        "VLLM_USE_LAYERNAME": "0" if mode == "layerpass-str" else "1",
        "OMP_NUM_THREADS": str(cfg.threads), "PYTHONUNBUFFERED": "1",
        # compile in-process: every mode's compile is then single-threaded and comparable, and
        # parallel jobs do not oversubscribe the cores with compile-worker pools
        "TORCHINDUCTOR_COMPILE_THREADS": "1",
    })
    return env


def run_process(cmd: Sequence[str], env: dict[str, str], timeout_s: float, workdir: str) -> tuple[str, int | None, float, str]:
    """Run ``cmd`` in its own process group; returns (outcome, exit code, wall s, output tail).

    outcome is "done" or "timeout"; on timeout the whole group (compile workers too) is killed."""
    log = os.path.join(workdir, "log.txt")
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(list(cmd), env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout_s)
            outcome = "done"
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            rc, outcome = None, "timeout"
    wall = time.perf_counter() - t
    with open(log, errors="replace") as f:
        tail = f.read()[-4000:]
    return outcome, rc, wall, tail


def measure_phase(cfg: SweepConfig, model: str, layers: int, mode: str, phase: str, cache: str,
                  inductor_cache: str, timeout_s: float, capped: bool = False) -> dict[str, Any]:
    """One measurement in a fresh process; always returns a dict with "status" (and "wall_s").

    ``capped``: the timeout is what was left of the sweep budget, not the per-measurement limit."""
    workdir = tempfile.mkdtemp(prefix=f"lp-{phase}-")
    out = os.path.join(workdir, "row.json")
    cmd = [sys.executable, "-m", "layerpass.bench.measure", "--model", model, "--layers", str(layers),
           "--mode", mode, "--phase", phase, "--repeats", str(cfg.repeats), "--threads", str(cfg.threads), "--out", out]
    for name in cfg.imports:
        cmd += ["--import", name]
    try:
        outcome, rc, wall, tail = run_process(cmd, _env(cfg, mode, cache, inductor_cache), timeout_s, workdir)
        if outcome == "timeout":
            why = " (what was left of the sweep budget)" if capped else ""
            return {"status": "timeout", "reason": f"{phase} run exceeded {timeout_s:.0f} s{why}", "wall_s": wall}
        row = None
        if os.path.exists(out):
            with open(out) as f:
                row = json.load(f)
        else:  # crashed before writing: take a row line from the log if any
            for line in tail.splitlines():
                if line.startswith(ROW_PREFIX):
                    row = json.loads(line[len(ROW_PREFIX):])
        if row is None:
            last = [ln for ln in tail.splitlines() if ln.strip()][-1:] or ["no output"]
            return {"status": "failed", "reason": f"{phase} process exited with code {rc}: {last[0][:250]}", "wall_s": wall}
        row["wall_s"] = wall
        return row
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def empty_row(model: str, layers: int, mode: str) -> dict[str, Any]:
    row: dict[str, Any] = {k: None for k in ROW_FIELDS}
    row.update({"model": model, "layers": layers, "mode": mode})
    return row


def fusion_total(matches: dict[str, int]) -> int:
    """Matches of the fusion passes only (names with "fuse"/"fusion"); the report also counts clean-up
    passes (no-op elimination, fix functionalization), which stay visible in ``fusion_matches``."""
    return int(sum(v for k, v in matches.items() if "fuse" in k.lower() or "fusion" in k.lower()))


def merge(model: str, layers: int, mode: str, cold: dict[str, Any], warm: dict[str, Any] | None,
          rel_tolerance: float, timeout_s: float) -> dict[str, Any]:
    """One results row from the cold and (if it ran) warm measurements."""
    row = empty_row(model, layers, mode)
    row["timeout_s"] = timeout_s
    row["cold_status"] = cold["status"]
    row["cold_wall_s"] = cold.get("wall_s")
    for k in ("dynamo_s", "compile_s", "first_call_s", "pieces", "unique_pieces", "compiled_pieces", "fusion_matches",
              "max_abs_err", "ref_max_abs", "step_ms_compiled", "step_ms_eager", "step_ms_compiled_min",
              "step_ms_eager_min", "repeats"):
        row[k] = cold.get(k)
    if row["fusion_matches"] is not None:
        row["fusion_matches_total"] = fusion_total(row["fusion_matches"])
    if row["step_ms_compiled"] and row["step_ms_eager"]:
        row["step_speedup"] = row["step_ms_eager"] / row["step_ms_compiled"]
    if warm is not None:
        row["warm_status"] = warm["status"]
        row["warm_wall_s"] = warm.get("wall_s")
        row["warm_start_s"] = warm.get("first_call_s")
        row["warm_compile_s"] = warm.get("compile_s")
        row["warm_compiled_pieces"] = warm.get("compiled_pieces")
        row["warm_cache_hits"] = warm.get("cache_hits")
        row["warm_max_abs_err"] = warm.get("max_abs_err")
    if cold["status"] != "ok":
        row["status"], row["reason"] = cold["status"], cold.get("reason")
        return row
    if warm is not None and warm["status"] != "ok":
        row["status"], row["reason"] = warm["status"], f"warm: {warm.get('reason')}"
        return row
    row["tolerance"] = rel_tolerance * max(1.0, row["ref_max_abs"] or 0.0)
    errs = [e for e in (row["max_abs_err"], row["warm_max_abs_err"]) if e is not None]
    if errs and max(errs) > row["tolerance"]:
        row["status"] = "mismatch"
        row["reason"] = f"max abs error {max(errs):.3g} against eager exceeds {row['tolerance']:.3g}"
    else:
        row["status"] = "ok"
    return row


def skipped_row(model: str, layers: int, mode: str, reason: str) -> dict[str, Any]:
    row = empty_row(model, layers, mode)
    row.update({"status": "skipped", "reason": reason})
    return row


def validate_row(row: Any) -> None:
    """Raise ``ValueError`` naming the problem if ``row`` does not follow the results schema."""
    if not isinstance(row, dict):
        raise ValueError(f"a results row must be an object, got {type(row).__name__}")
    missing = sorted(set(ROW_FIELDS) - set(row))
    extra = sorted(set(row) - set(ROW_FIELDS))
    if missing or extra:
        raise ValueError(f"results row {row.get('model')}/{row.get('layers')}/{row.get('mode')}: "
                         f"missing fields {missing}, unexpected fields {extra}")
    for k, types in ROW_FIELDS.items():
        v = row[k]
        if isinstance(v, bool) or not isinstance(v, types):
            allowed = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ValueError(f"results row field {k!r} must be {allowed}, got {type(v).__name__} {v!r}")
    if row["status"] not in STATUSES:
        raise ValueError(f"results row status {row['status']!r}; allowed: {', '.join(STATUSES)}")
    if row["mode"] not in MODES:
        raise ValueError(f"results row mode {row['mode']!r}; allowed: {', '.join(MODES)}")
    if row["layers"] < 1:
        raise ValueError(f"results row layers must be >= 1, got {row['layers']}")
    if row["status"] != "ok" and not row["reason"]:
        raise ValueError(f"results row with status {row['status']!r} must give a reason")
    if row["status"] in ("ok", "mismatch"):
        need = [k for k in ("first_call_s", "max_abs_err", "step_ms_compiled", "step_ms_eager", "warm_start_s")
                if row[k] is None]
        if need:
            raise ValueError(f"results row with status {row['status']!r} lacks {need}")
    fm = row["fusion_matches"]
    if fm is not None and not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                  for k, v in fm.items()):
        raise ValueError(f"fusion_matches must map pass name -> int, got {fm!r}")
    for k in ("dynamo_s", "compile_s", "first_call_s", "warm_start_s", "max_abs_err", "step_ms_compiled", "step_ms_eager"):
        if row[k] is not None and row[k] < 0:
            raise ValueError(f"results row field {k!r} must be >= 0, got {row[k]}")


def validate_results(doc: Any) -> None:
    """Raise ``ValueError`` if ``doc`` is not a valid results.json document."""
    if not isinstance(doc, dict):
        raise ValueError(f"results.json must hold an object, got {type(doc).__name__}")
    missing = [k for k in DOC_FIELDS if k not in doc]
    if missing:
        raise ValueError(f"results.json lacks {missing}; required: {', '.join(DOC_FIELDS)}")
    if doc["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"results.json schema_version {doc['schema_version']!r}; this reader knows {SCHEMA_VERSION}")
    if not isinstance(doc["rows"], list):
        raise ValueError("results.json 'rows' must be a list")
    for row in doc["rows"]:
        validate_row(row)


def write_results(doc: dict[str, Any], out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)
    return path


def _measure_row(cfg: SweepConfig, model: str, layers: int, mode: str, deadline: float | None,
                 progress: Callable[[str], Any] | None, advance: Callable[[int], Any] | None) -> dict[str, Any]:
    """Cold then warm on two fresh cache dirs (removed afterwards unless ``keep_cache``)."""

    def timeout() -> tuple[float, bool]:
        if deadline is None or deadline - time.perf_counter() >= cfg.timeout_s:
            return cfg.timeout_s, False
        return max(1.0, deadline - time.perf_counter()), True

    cache = tempfile.mkdtemp(prefix="layerpass-bench-cache-")
    inductor_cache = tempfile.mkdtemp(prefix="layerpass-bench-inductor-")
    try:
        if progress:
            progress(f"{model} L={layers} {mode} cold")
        cold_timeout, capped = timeout()
        cold = measure_phase(cfg, model, layers, mode, "cold", cache, inductor_cache, cold_timeout, capped)
        if advance:
            advance(1)
        warm = None
        if cold["status"] == "ok":
            warm_timeout, capped = timeout()
            if warm_timeout >= MIN_SLOT_S / 2:
                if progress:
                    progress(f"{model} L={layers} {mode} warm")
                warm = measure_phase(cfg, model, layers, mode, "warm", cache, inductor_cache, warm_timeout, capped)
            else:
                warm = {"status": "skipped", "reason": f"sweep budget of {cfg.budget_s:.0f} s used up"}
        if advance:
            advance(1)
        return merge(model, layers, mode, cold, warm, cfg.rel_tolerance, cold_timeout)
    finally:
        if not cfg.keep_cache:
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(inductor_cache, ignore_errors=True)


def run_sweep(cfg: SweepConfig, progress: Callable[[str], Any] | None = None,
              advance: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """Run the sweep; returns the results document (also written to ``<out_dir>/results.json``).

    Up to ``cfg.jobs`` measurements run at once, but never two of one (model, mode): its layer
    counts run in increasing order, so one that timed out skips the larger ones.
    ``progress(text)`` is told what runs next, ``advance(n)`` how many of the ``2 * len(plan)``
    process slots just finished (or were skipped)."""
    check_models(cfg.models, cfg.imports)
    start = time.perf_counter()
    deadline = None if cfg.budget_s is None else start + cfg.budget_s
    config = asdict(cfg)
    config.pop("extra_env")
    doc: dict[str, Any] = {"schema_version": SCHEMA_VERSION,
                           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           "machine": machine_info(), "config": config, "wall_s": 0.0, "rows": []}
    order = plan(cfg)
    rows: dict[tuple[str, int, str], dict[str, Any]] = {}
    timed_out: dict[tuple[str, str], int] = {}
    lock = threading.Lock()

    def record(unit: tuple[str, int, str], row: dict[str, Any]) -> None:
        with lock:
            rows[unit] = row
            if row["cold_status"] == "timeout" and (row["timeout_s"] or 0) >= cfg.timeout_s:
                timed_out[unit[0], unit[2]] = unit[1]
            doc["rows"] = [rows[u] for u in order if u in rows]
            doc["wall_s"] = time.perf_counter() - start
            write_results(doc, cfg.out_dir)

    def skip_reason(model: str, mode: str) -> str | None:
        if (model, mode) in timed_out:
            return f"timed out at {timed_out[model, mode]} layers"
        if deadline is not None and deadline - time.perf_counter() < MIN_SLOT_S:
            return f"sweep budget of {cfg.budget_s:.0f} s used up"
        return None

    pending = list(order)
    running: dict[concurrent.futures.Future, tuple[str, int, str]] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=cfg.jobs) as pool:
        while pending or running:
            busy = {(u[0], u[2]) for u in running.values()}
            while len(running) < cfg.jobs:
                unit = next((u for u in pending if (u[0], u[2]) not in busy), None)
                if unit is None:
                    break
                pending.remove(unit)
                model, layers, mode = unit
                reason = skip_reason(model, mode)
                if reason is not None:
                    record(unit, skipped_row(model, layers, mode, reason))
                    if advance:
                        advance(2)
                    continue
                busy.add((model, mode))
                running[pool.submit(_measure_row, cfg, model, layers, mode, deadline, progress, advance)] = unit
            if running:
                done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    record(running.pop(future), future.result())
    doc["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    doc["wall_s"] = time.perf_counter() - start
    validate_results(doc)
    write_results(doc, cfg.out_dir)
    return doc
