"""The sweep's scheduler: every (model, layers, mode) row measured cold, then warm, in fresh processes.

For every row it takes two new empty cache directories (``runner.fresh_cache_dirs``: the layerpass
artifact cache and ``TORCHINDUCTOR_CACHE_DIR``), runs ``bench/measure.py`` cold in a new process
(``runner.run_fresh``), then warm in another new process on the same directories, and merges both
into one row (``rows.merge``). Every row is written to ``results.json`` (and ``results.md``) as soon
as it is known, so an interrupted sweep keeps what it measured.

There is no sweep budget: every row is measured however slow the machine. Each process has a
generous limit (``config.timeout_for``) meant only to end a hung one; a (model, mode) that hung skips
its larger layer counts (recorded as ``skipped``), so the table is always complete.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .config import SweepConfig, check_models
from .presets import Unit
from .results import loadavg, new_document, write_results
from .rows import merge, skipped_row
from .runner import CacheDirs, fresh_cache_dirs, run_fresh
from .schema import validate_results
from .summary import acceptance_ratios

Describe = Callable[[str], Any]  # told what runs next
Advance = Callable[[int], Any]  # told how many process slots just finished (or were skipped)


def plan(cfg: SweepConfig) -> list[Unit]:
    """The rows in run order: the preset's groups in order (custom: small layer counts first); each
    (model, mode) in increasing layer counts, so one that hung skips its larger ones."""
    return list(cfg.units)


def table_order(cfg: SweepConfig, units: Sequence[Unit]) -> list[Unit]:
    """The order of rows in results.json and the table: by model, layer count, then mode (config order)."""
    models, modes = list(cfg.models), list(cfg.modes)
    return sorted(units, key=lambda u: (models.index(u[0]), u[1], modes.index(u[2])))


def measure_command(cfg: SweepConfig, unit: Unit, phase: str) -> list[str]:
    """The arguments of ``python`` for one measurement (``bench/measure.py``)."""
    model, layers, mode = unit
    cmd = ["-m", "layerpass.bench.measure", "--model", model, "--layers", str(layers), "--mode", mode,
           "--phase", phase, "--repeats", str(cfg.repeats), "--threads", str(cfg.threads)]
    for name in cfg.imports:
        cmd += ["--import", name]
    return cmd


def measure_env(cfg: SweepConfig) -> dict[str, str]:
    """Environment every measurement gets on top of the runner's (caches, layer-name switch)."""
    # compile in-process: every mode's compile is then single-threaded and comparable, and
    # parallel jobs do not oversubscribe the cores with compile-worker pools
    return {**cfg.extra_env, "OMP_NUM_THREADS": str(cfg.threads), "TORCHINDUCTOR_COMPILE_THREADS": "1"}


def measure_phase(cfg: SweepConfig, unit: Unit, phase: str, caches: CacheDirs, timeout_s: float) -> dict[str, Any]:
    """One measurement in a fresh process; always returns a dict with "status" and "wall_s"."""
    run = run_fresh(measure_command(cfg, unit, phase), caches, use_layername=unit[2] != "layerpass-str",
                    timeout_s=timeout_s, env=measure_env(cfg))
    if run.timed_out:
        return {"status": "timeout", "reason": f"{phase} run exceeded {timeout_s:.0f} s", "wall_s": run.wall_s}
    if run.result is None:
        return {"status": "failed", "wall_s": run.wall_s,
                "reason": f"{phase} process exited with code {run.returncode}: {run.last_output_line()[:250]}"}
    return {**run.result, "wall_s": run.wall_s}


def measure_row(cfg: SweepConfig, unit: Unit, describe: Describe | None = None,
                advance: Advance | None = None) -> dict[str, Any]:
    """Cold then (if cold was ok) warm on two fresh cache dirs, removed afterwards unless ``keep_cache``."""
    model, layers, mode = unit
    limit = cfg.timeout(layers)
    with fresh_cache_dirs(keep=cfg.keep_cache) as caches:
        if describe:
            describe(f"{model} L={layers} {mode} cold")
        cold = measure_phase(cfg, unit, "cold", caches, limit)
        if advance:
            advance(1)
        warm = None
        if cold["status"] == "ok":
            if describe:
                describe(f"{model} L={layers} {mode} warm")
            warm = measure_phase(cfg, unit, "warm", caches, limit)
        if advance:
            advance(1)
    return merge(model, layers, mode, cold, warm, cfg.rel_tolerance, limit)


def run_sweep(cfg: SweepConfig, progress: Describe | None = None, advance: Advance | None = None,
              on_row: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
    """Run the sweep; returns the results document (also written to ``<out_dir>/results.json``).

    Up to ``cfg.jobs`` measurements run at once (default one), never two of one (model, mode): its
    layer counts run in increasing order, and one that timed out (hung: the limits are generous)
    skips the larger ones. ``progress(text)`` is told what runs next, ``advance(n)`` how many of the
    ``2 * len(plan)`` process slots just finished (or were skipped), ``on_row(row)`` each finished row."""
    check_models(cfg.models, cfg.imports)
    start = time.perf_counter()
    doc = new_document(cfg)
    shown = table_order(cfg, plan(cfg))
    rows: dict[Unit, dict[str, Any]] = {}
    timed_out: dict[tuple[str, str], int] = {}  # (model, mode) -> the layer count that hung
    lock = threading.Lock()

    def record(unit: Unit, row: dict[str, Any]) -> None:
        with lock:
            rows[unit] = row
            if row["cold_status"] == "timeout" or row["warm_status"] == "timeout":
                timed_out.setdefault((unit[0], unit[2]), unit[1])
            doc["rows"] = [rows[u] for u in shown if u in rows]
            doc["ratios"] = acceptance_ratios(doc["rows"])
            doc["wall_s"] = time.perf_counter() - start
            write_results(doc, cfg.out_dir)
        if on_row:
            on_row(row)

    pending = plan(cfg)
    running: dict[concurrent.futures.Future, Unit] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=cfg.jobs) as pool:
        while pending or running:
            busy = {(u[0], u[2]) for u in running.values()}
            while len(running) < cfg.jobs:
                unit = next((u for u in pending if (u[0], u[2]) not in busy), None)
                if unit is None:
                    break
                pending.remove(unit)
                model, layers, mode = unit
                if (model, mode) in timed_out:
                    record(unit, skipped_row(model, layers, mode, f"timed out at {timed_out[model, mode]} layers"))
                    if advance:
                        advance(2)
                    continue
                busy.add((model, mode))
                running[pool.submit(measure_row, cfg, unit, progress, advance)] = unit
            if running:
                done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    record(running.pop(future), future.result())
    doc["machine"]["loadavg_end"] = loadavg()
    doc["wall_s"] = time.perf_counter() - start
    validate_results(doc)
    write_results(doc, cfg.out_dir)
    return doc
