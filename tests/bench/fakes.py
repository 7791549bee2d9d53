"""Stand-ins for real measurements: what ``measure.py`` reports, and a fake ``sweep.measure_phase``."""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from layerpass.bench.rows import merge


def fragment(model: str, layers: int, mode: str, phase: str) -> dict[str, Any]:
    """A plausible ok report of one process: layerpass flat in depth, inductor growing with it."""
    lp = mode.startswith("layerpass")
    cold_s = {"layerpass": 10.0 + 0.05 * layers, "inductor": 10.0 + layers}.get(mode, 12.0)
    frag: dict[str, Any] = {"status": "ok", "first_call_s": cold_s if phase == "cold" else cold_s / 10,
                            "dynamo_s": 0.5, "compile_s": 5.0, "max_abs_err": 0.0, "ref_max_abs": 3.0}
    if phase == "cold":
        frag.update({"step_ms_compiled": 1.0, "step_ms_eager": 1.5, "step_ms_compiled_min": 0.9,
                     "step_ms_eager_min": 1.4, "repeats": 3})
    if lp:
        frag.update({"pieces": layers + 2, "unique_pieces": 4, "compiled_pieces": 4 if phase == "cold" else 0,
                     "cache_hits": 0 if phase == "cold" else 4, "fusion_matches": {},
                     "trace": "regions", "num_regions": 2, "warm_start": "saved" if phase == "cold" else "loaded"})
    return frag


def valid_row() -> dict[str, Any]:
    """A merged ``ok`` layerpass row with every figure set."""
    cold = {"status": "ok", "wall_s": 3.0, "dynamo_s": 1.0, "compile_s": 2.0, "first_call_s": 3.1, "max_abs_err": 0.0,
            "ref_max_abs": 2.0, "step_ms_compiled": 1.0, "step_ms_eager": 2.0, "step_ms_compiled_min": 0.9,
            "step_ms_eager_min": 1.8, "repeats": 5, "pieces": 4, "unique_pieces": 4, "compiled_pieces": 4,
            "fusion_matches": {"fuse_norm_quant": 2}, "trace": "regions", "num_regions": 2, "warm_start": "saved",
            "timeline": [{"what": "trace DecoderLayer", "start_s": 0.1, "end_s": 3.0, "duration_s": 2.9}]}
    warm = {"status": "ok", "wall_s": 1.0, "first_call_s": 0.5, "compile_s": 0.3, "dynamo_s": 0.0, "max_abs_err": 0.0,
            "compiled_pieces": 0, "cache_hits": 4, "warm_start": "loaded",
            "timeline": [{"what": "load pieces", "start_s": 0.2, "end_s": 0.4, "duration_s": 0.2}]}
    return merge("llama", 2, "layerpass", cold, warm, 0.05, 60.0)


class FakeMeasure:
    """Stands in for ``sweep.measure_phase``: records calls, concurrency and what results.json held."""

    def __init__(self, out_dir: str, hang: set = frozenset(), delay: float = 0.0) -> None:
        self.out_dir, self.hang, self.delay = out_dir, hang, delay
        self.calls: list[tuple] = []
        self.rows_seen: list[int] = []
        self.running = self.most = 0
        self.lock = threading.Lock()

    def __call__(self, cfg, unit, phase, caches, timeout_s):
        model, layers, mode = unit
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.calls.append((model, layers, mode, phase, timeout_s))
            path = os.path.join(self.out_dir, "results.json")
            if phase == "cold":
                self.rows_seen.append(len(json.load(open(path))["rows"]) if os.path.exists(path) else 0)
        try:
            time.sleep(self.delay)
            if unit in self.hang:
                return {"status": "timeout", "reason": f"{phase} run exceeded {timeout_s:.0f} s", "wall_s": timeout_s}
            return {**fragment(model, layers, mode, phase), "wall_s": 1.0}
        finally:
            with self.lock:
                self.running -= 1
