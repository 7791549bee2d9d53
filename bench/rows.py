"""One ``results.json`` row from what a row's processes reported: cold, then (if it ran) warm.

A row's status is the first thing that went wrong: the cold process, then the warm one, then an
error against eager above the tolerance (``mismatch``); ``skipped`` rows never ran.
"""

from __future__ import annotations

from typing import Any

from .schema import empty_row

# measurement fields copied as they are from the cold process
_COLD_FIELDS = ("dynamo_s", "compile_s", "first_call_s", "pieces", "unique_pieces", "compiled_pieces", "fusion_matches",
                "max_abs_err", "ref_max_abs", "step_ms_compiled", "step_ms_eager", "step_ms_compiled_min",
                "step_ms_eager_min", "repeats", "trace", "num_regions", "inductor_import_s")
# row field <- cold process field
_COLD_RENAMED = {"cold_timeline": "timeline"}
# row field <- warm process field
_WARM_FIELDS = {"warm_wall_s": "wall_s", "warm_start_s": "first_call_s", "warm_compile_s": "compile_s",
                "warm_compiled_pieces": "compiled_pieces", "warm_cache_hits": "cache_hits",
                "warm_max_abs_err": "max_abs_err", "warm_dynamo_s": "dynamo_s", "warm_warm_start": "warm_start",
                "warm_inductor_import_s": "inductor_import_s", "warm_timeline": "timeline"}


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
    for k in _COLD_FIELDS:
        row[k] = cold.get(k)
    for k, cold_key in _COLD_RENAMED.items():
        row[k] = cold.get(cold_key)
    row["cold_warm_start"] = cold.get("warm_start")
    if row["fusion_matches"] is not None:
        row["fusion_matches_total"] = fusion_total(row["fusion_matches"])
    if row["step_ms_compiled"] and row["step_ms_eager"]:
        row["step_speedup"] = row["step_ms_eager"] / row["step_ms_compiled"]
    if warm is not None:
        row["warm_status"] = warm["status"]
        for k, warm_key in _WARM_FIELDS.items():
            row[k] = warm.get(warm_key)
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
    """A row that was not measured, and why."""
    row = empty_row(model, layers, mode)
    row.update({"status": "skipped", "reason": reason})
    return row
