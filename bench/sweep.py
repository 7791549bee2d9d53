"""The sweep driver: a plan of (model, layers, mode) rows, one fresh process per measurement.

For every row it creates two empty temporary directories (the layerpass artifact cache and
``TORCHINDUCTOR_CACHE_DIR``), runs ``bench/measure.py`` cold in a new process, then warm in another
new process on the same directories, and merges both into one row (schema: ``ROW_FIELDS`` below
and ``bench/README.md``). Every row is written to ``results.json`` (and ``results.md``) as soon as
it is known, so an interrupted sweep keeps what it measured.

Presets (``PRESETS``): ``default`` (what ``make bench`` runs), ``quick`` and ``full``; or any
product models x layers x modes. There is no sweep budget: a slow machine gives the same
(complete) table, later. Each measurement process gets a generous time limit scaled to its size
(``timeout_for``), meant only to end a hung process; measurements run one at a time by default.
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
from .summary import acceptance_ratios, markdown_table, validate_ratios

SCHEMA_VERSION = 2
Unit = tuple[str, int, str]  # (model, layers, mode)
# A preset is a list of groups, each the product models x layers x modes; groups run in this order
# (the acceptance rows first), layer counts increasing within a group.
PRESETS: dict[str, tuple[tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]], ...]] = {
    # llama's depth curve, both compilers; the other dense/MoE models at both ends; the two
    # comparison modes where they are cheap (regional already fails from 8 layers on).
    "default": ((("llama",), (2, 8, 32, 80), ("layerpass", "inductor")),
                (("llama-fp8", "moe"), (2, 80), ("layerpass", "inductor")),
                (("llama",), (2, 8), ("layerpass-str", "regional"))),
    # the fewest rows that give every llama acceptance ratio: depth-free means 80 vs 2 layers
    "quick": ((("llama",), (2, 80), ("layerpass", "inductor")),),
    "full": ((("llama", "llama-fp8", "moe"), (2, 8, 32, 80), MODES),),
}
PRESET_NAMES = tuple(PRESETS)
DEFAULT_JOBS = 1  # measurements at once: one, so they never compete for the cores
# Per-measurement time limit: generous and scaled to size, so only a hung process reaches it.
# (On the reference 2-core machine the slowest default row, inductor at 80 layers, needs about
# 2 minutes; the limit there is 1900 s.)
TIMEOUT_BASE_S = 300.0
TIMEOUT_PER_LAYER_S = 20.0
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
    "warm_start_s": _OPT_NUM, "warm_compile_s": _OPT_NUM, "warm_dynamo_s": _OPT_NUM,
    "trace": _OPT_STR, "num_regions": _OPT_INT, "cold_warm_start": _OPT_STR, "warm_warm_start": _OPT_STR,
    "pieces": _OPT_INT, "unique_pieces": _OPT_INT, "compiled_pieces": _OPT_INT,
    "warm_compiled_pieces": _OPT_INT, "warm_cache_hits": _OPT_INT,
    "fusion_matches": _OPT_DICT, "fusion_matches_total": _OPT_INT,
    "max_abs_err": _OPT_NUM, "warm_max_abs_err": _OPT_NUM, "ref_max_abs": _OPT_NUM, "tolerance": _OPT_NUM,
    "step_ms_compiled": _OPT_NUM, "step_ms_eager": _OPT_NUM, "step_speedup": _OPT_NUM,
    "step_ms_compiled_min": _OPT_NUM, "step_ms_eager_min": _OPT_NUM, "repeats": _OPT_INT,
    "cold_wall_s": _OPT_NUM, "warm_wall_s": _OPT_NUM, "timeout_s": _OPT_NUM,
    "inductor_import_s": _OPT_NUM, "warm_inductor_import_s": _OPT_NUM,
}
DOC_FIELDS = ("schema_version", "created", "machine", "config", "wall_s", "rows", "ratios")


def preset_units(name: str) -> tuple[Unit, ...]:
    """The rows of a preset, in run order."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed: {', '.join(PRESET_NAMES)}")
    units: list[Unit] = []
    for models, layers, modes in PRESETS[name]:
        for n in layers:
            units += [(m, n, mode) for m in models for mode in modes if (m, n, mode) not in units]
    return tuple(units)


def _axes(name: str) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    """The models, layer counts and modes a custom sweep takes from a preset when not given.

    Modes: the preset's first group's (layerpass vs inductor; all four for ``full``)."""
    groups = PRESETS[name]
    models = tuple(dict.fromkeys(m for g in groups for m in g[0]))
    layers = tuple(sorted({n for g in groups for n in g[1]}))
    return models, layers, groups[0][2]


def timeout_for(layers: int, scale: float = 1.0) -> float:
    """The default time limit of one measurement process: ``scale * (300 + 20 * layers)`` seconds."""
    return scale * (TIMEOUT_BASE_S + TIMEOUT_PER_LAYER_S * layers)


@dataclass
class SweepConfig:
    """What to sweep and how.

    Rows: ``units`` if given; else, if any of ``models``/``layers``/``modes`` is given, their product
    (the missing ones taken from the preset); else the ``preset``'s rows. After construction
    ``units`` holds the resolved rows and ``models``/``layers``/``modes`` the values they use."""

    models: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    modes: tuple[str, ...] | None = None
    preset: str = "default"
    units: tuple[Unit, ...] | None = None
    out_dir: str = "bench-results"
    timeout_s: float | None = None  # fixed limit per process (cold or warm); None: timeout_for(layers)
    timeout_scale: float = 1.0  # multiplies the scaled default limit
    repeats: int = 20
    threads: int = 1
    jobs: int = DEFAULT_JOBS  # measurements at once (never two of one model+mode)
    rel_tolerance: float = 0.05  # max_abs_err allowed, relative to max(1, max |eager logits|)
    imports: tuple[str, ...] = ()
    keep_cache: bool = False
    command: str = ""  # the command line that started the sweep (recorded, shown under the table)
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; allowed: {', '.join(PRESET_NAMES)}")
        for name in ("models", "layers", "modes"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(value))
        if self.modes is not None:
            bad_modes = [m for m in self.modes if m not in MODES]
            if bad_modes or not self.modes:
                raise ValueError(f"unknown or no modes {bad_modes or list(self.modes)}; allowed: {', '.join(MODES)}")
        if self.layers is not None and (not self.layers or any(
                not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in self.layers)):
            raise ValueError(f"layer counts must be positive ints, got {list(self.layers)}")
        if self.models is not None and not self.models:
            raise ValueError("no models given")
        if self.units is None:
            if self.models is None and self.layers is None and self.modes is None:
                self.units = preset_units(self.preset)
            else:
                models, layers, modes = _axes(self.preset)
                models, modes = self.models or models, self.modes or modes
                self.units = tuple((m, n, mode) for n in sorted(set(self.layers or layers))
                                   for m in dict.fromkeys(models) for mode in dict.fromkeys(modes))
        self.units = tuple((str(m), int(n), str(mode)) for m, n, mode in self.units)
        if not self.units:
            raise ValueError("nothing to measure")
        bad = [u for u in self.units if u[2] not in MODES or u[1] < 1]
        if bad:
            raise ValueError(f"bad rows {bad}: modes must be one of {', '.join(MODES)}, layer counts >= 1")
        self.models = tuple(dict.fromkeys(u[0] for u in self.units))
        self.layers = tuple(sorted({u[1] for u in self.units}))
        used = dict.fromkeys(u[2] for u in self.units)  # the order given, else the canonical order of MODES
        self.modes = tuple(m for m in (self.modes or MODES) if m in used) + tuple(m for m in used if m not in MODES)
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout_s}")
        if self.timeout_scale <= 0:
            raise ValueError(f"timeout scale must be > 0, got {self.timeout_scale}")
        if self.repeats < 1 or self.threads < 1 or self.jobs < 1:
            raise ValueError(f"repeats, threads and jobs must be >= 1, got {self.repeats}, {self.threads}, {self.jobs}")

    @property
    def sweep_name(self) -> str:
        """The preset's name if the rows are exactly the preset's, else ``custom``."""
        return self.preset if self.units == preset_units(self.preset) else "custom"

    def timeout(self, layers: int) -> float:
        """The time limit of one measurement process (cold or warm) at ``layers``."""
        return self.timeout_s if self.timeout_s is not None else timeout_for(layers, self.timeout_scale)


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


def plan(cfg: SweepConfig) -> list[Unit]:
    """The rows in run order: the preset's groups in order (custom: small layer counts first); each
    (model, mode) in increasing layer counts, so one that hung skips its larger ones."""
    return list(cfg.units)


def table_order(cfg: SweepConfig, units: Sequence[Unit]) -> list[Unit]:
    """The order of rows in results.json and the table: by model, layer count, then mode (config order)."""
    models, modes = list(cfg.models), list(cfg.modes)
    return sorted(units, key=lambda u: (models.index(u[0]), u[1], modes.index(u[2])))


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
                  inductor_cache: str, timeout_s: float) -> dict[str, Any]:
    """One measurement in a fresh process; always returns a dict with "status" (and "wall_s")."""
    workdir = tempfile.mkdtemp(prefix=f"lp-{phase}-")
    out = os.path.join(workdir, "row.json")
    cmd = [sys.executable, "-m", "layerpass.bench.measure", "--model", model, "--layers", str(layers),
           "--mode", mode, "--phase", phase, "--repeats", str(cfg.repeats), "--threads", str(cfg.threads), "--out", out]
    for name in cfg.imports:
        cmd += ["--import", name]
    try:
        outcome, rc, wall, tail = run_process(cmd, _env(cfg, mode, cache, inductor_cache), timeout_s, workdir)
        if outcome == "timeout":
            return {"status": "timeout", "reason": f"{phase} run exceeded {timeout_s:.0f} s", "wall_s": wall}
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
              "step_ms_eager_min", "repeats", "trace", "num_regions", "inductor_import_s"):
        row[k] = cold.get(k)
    row["cold_warm_start"] = cold.get("warm_start")
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
        row["warm_dynamo_s"] = warm.get("dynamo_s")
        row["warm_warm_start"] = warm.get("warm_start")
        row["warm_inductor_import_s"] = warm.get("inductor_import_s")
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
    for k in ("dynamo_s", "compile_s", "first_call_s", "warm_start_s", "warm_dynamo_s", "max_abs_err",
              "step_ms_compiled", "step_ms_eager", "num_regions"):
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
    validate_ratios(doc["ratios"])


def write_results(doc: dict[str, Any], out_dir: str) -> str:
    """Write ``results.json`` and ``results.md`` into ``out_dir`` (atomically); returns the JSON's path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    for name, text in (("results.json", json.dumps(doc, indent=1)), ("results.md", markdown_table(doc) + "\n")):
        target = os.path.join(out_dir, name)
        tmp = f"{target}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, target)
    return path


def _measure_row(cfg: SweepConfig, model: str, layers: int, mode: str,
                 progress: Callable[[str], Any] | None, advance: Callable[[int], Any] | None) -> dict[str, Any]:
    """Cold then warm on two fresh cache dirs (removed afterwards unless ``keep_cache``)."""
    limit = cfg.timeout(layers)
    cache = tempfile.mkdtemp(prefix="layerpass-bench-cache-")
    inductor_cache = tempfile.mkdtemp(prefix="layerpass-bench-inductor-")
    try:
        if progress:
            progress(f"{model} L={layers} {mode} cold")
        cold = measure_phase(cfg, model, layers, mode, "cold", cache, inductor_cache, limit)
        if advance:
            advance(1)
        warm = None
        if cold["status"] == "ok":
            if progress:
                progress(f"{model} L={layers} {mode} warm")
            warm = measure_phase(cfg, model, layers, mode, "warm", cache, inductor_cache, limit)
        if advance:
            advance(1)
        return merge(model, layers, mode, cold, warm, cfg.rel_tolerance, limit)
    finally:
        if not cfg.keep_cache:
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(inductor_cache, ignore_errors=True)


def config_record(cfg: SweepConfig) -> dict[str, Any]:
    """The configuration as recorded in results.json (``units`` as lists, the limits per layer count)."""
    config = asdict(cfg)
    config.pop("extra_env")
    config["units"] = [list(u) for u in cfg.units]
    config["sweep"] = cfg.sweep_name
    config["timeouts_s"] = {str(n): cfg.timeout(n) for n in cfg.layers}
    return config


def run_sweep(cfg: SweepConfig, progress: Callable[[str], Any] | None = None,
              advance: Callable[[int], Any] | None = None,
              on_row: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
    """Run the sweep; returns the results document (also written to ``<out_dir>/results.json``).

    Up to ``cfg.jobs`` measurements run at once (default one), never two of one (model, mode): its
    layer counts run in increasing order, and one that timed out (hung: the limits are generous)
    skips the larger ones. ``progress(text)`` is told what runs next, ``advance(n)`` how many of the
    ``2 * len(plan)`` process slots just finished (or were skipped), ``on_row(row)`` each finished row."""
    check_models(cfg.models, cfg.imports)
    start = time.perf_counter()
    doc: dict[str, Any] = {"schema_version": SCHEMA_VERSION,
                           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           "machine": machine_info(), "config": config_record(cfg), "wall_s": 0.0, "rows": [],
                           "ratios": []}
    order = plan(cfg)
    shown = table_order(cfg, order)
    rows: dict[Unit, dict[str, Any]] = {}
    timed_out: dict[tuple[str, str], int] = {}
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

    pending = list(order)
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
                running[pool.submit(_measure_row, cfg, model, layers, mode, progress, advance)] = unit
            if running:
                done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    record(running.pop(future), future.result())
    doc["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    doc["wall_s"] = time.perf_counter() - start
    validate_results(doc)
    write_results(doc, cfg.out_dir)
    return doc
