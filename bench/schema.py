"""The ``results.json`` schema (version 2, documented in ``bench/README.md``) and its validation.

Written by hand rather than with a schema library so the bench needs nothing beyond the
standard library to check its own output.
"""

from __future__ import annotations

from typing import Any

from .measure import MODES
from .summary import validate_ratios

SCHEMA_VERSION = 2
STATUSES = ("ok", "mismatch", "failed", "timeout", "skipped")

_OPT_NUM = (int, float, type(None))
_OPT_INT = (int, type(None))
_OPT_STR = (str, type(None))
_OPT_DICT = (dict, type(None))
_OPT_LIST = (list, type(None))
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
    "cold_timeline": _OPT_LIST, "warm_timeline": _OPT_LIST,
}
SPAN_FIELDS = {"what": (str,), "start_s": (int, float), "end_s": (int, float), "duration_s": (int, float)}
DOC_FIELDS = ("schema_version", "created", "machine", "config", "wall_s", "rows", "ratios")
# figures an ``ok`` or ``mismatch`` row must have: it ran, cold and warm
_MEASURED = ("first_call_s", "max_abs_err", "step_ms_compiled", "step_ms_eager", "warm_start_s")
_NON_NEGATIVE = ("dynamo_s", "compile_s", "first_call_s", "warm_start_s", "warm_dynamo_s", "max_abs_err",
                 "step_ms_compiled", "step_ms_eager", "num_regions")


def empty_row(model: str, layers: int, mode: str) -> dict[str, Any]:
    """A row with every field ``None`` but its identity."""
    row: dict[str, Any] = {k: None for k in ROW_FIELDS}
    row.update({"model": model, "layers": layers, "mode": mode})
    return row


def _check_types(row: dict[str, Any]) -> None:
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


def validate_row(row: Any) -> None:
    """Raise ``ValueError`` naming the problem if ``row`` does not follow the results schema."""
    if not isinstance(row, dict):
        raise ValueError(f"a results row must be an object, got {type(row).__name__}")
    _check_types(row)
    if row["status"] not in STATUSES:
        raise ValueError(f"results row status {row['status']!r}; allowed: {', '.join(STATUSES)}")
    if row["mode"] not in MODES:
        raise ValueError(f"results row mode {row['mode']!r}; allowed: {', '.join(MODES)}")
    if row["layers"] < 1:
        raise ValueError(f"results row layers must be >= 1, got {row['layers']}")
    if row["status"] != "ok" and not row["reason"]:
        raise ValueError(f"results row with status {row['status']!r} must give a reason")
    if row["status"] in ("ok", "mismatch"):
        need = [k for k in _MEASURED if row[k] is None]
        if need:
            raise ValueError(f"results row with status {row['status']!r} lacks {need}")
    fm = row["fusion_matches"]
    if fm is not None and not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                  for k, v in fm.items()):
        raise ValueError(f"fusion_matches must map pass name -> int, got {fm!r}")
    for k in ("cold_timeline", "warm_timeline"):
        for span in row[k] or []:
            if not isinstance(span, dict) or set(span) != set(SPAN_FIELDS) or not all(
                    isinstance(span[f], t) and not isinstance(span[f], bool) for f, t in SPAN_FIELDS.items()):
                raise ValueError(f"results row field {k!r}: each span must be an object with exactly "
                                 f"{', '.join(SPAN_FIELDS)} (what: str, the rest numbers), got {span!r}")
    for k in _NON_NEGATIVE:
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
