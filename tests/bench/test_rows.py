"""``bench/rows.py``: a row merged from any cold/warm reports validates, and its status follows them."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerpass.bench.measure import MODES
from layerpass.bench.rows import fusion_total, merge, skipped_row
from layerpass.bench.schema import validate_row

finite = st.floats(min_value=0.0, max_value=1e4, allow_nan=False, allow_infinity=False)


@st.composite
def cold_fragments(draw, status=None):
    """What measure.py returns for a cold run (ok), or a failure/timeout fragment."""
    status = status or draw(st.sampled_from(["ok", "ok", "failed", "timeout"]))
    if status != "ok":
        return {"status": status, "reason": draw(st.text(min_size=1, max_size=40)), "wall_s": draw(finite)}
    layerpass_mode = draw(st.booleans())
    frag = {"status": "ok", "wall_s": draw(finite), "dynamo_s": draw(finite), "compile_s": draw(finite),
            "first_call_s": draw(finite), "max_abs_err": draw(finite), "ref_max_abs": draw(finite),
            "step_ms_compiled": draw(finite) + 1e-3, "step_ms_eager": draw(finite) + 1e-3,
            "step_ms_compiled_min": draw(finite), "step_ms_eager_min": draw(finite), "repeats": draw(st.integers(1, 50))}
    if layerpass_mode:
        unique = draw(st.integers(1, 10))
        frag.update({"trace": draw(st.sampled_from(["regions", "whole-model", None])),
                     "num_regions": draw(st.one_of(st.none(), st.integers(0, 5))),
                     "warm_start": draw(st.sampled_from(["saved", "off", "fallback: no API", None]))})
        frag.update({"pieces": unique + draw(st.integers(0, 80)), "unique_pieces": unique, "compiled_pieces": unique,
                     "fusion_matches": draw(st.dictionaries(st.sampled_from(["fuse_norm_quant", "fuse_moe", "fix_functionalization"]),
                                                            st.integers(0, 100)))})
    return frag


@st.composite
def warm_fragments(draw):
    status = draw(st.sampled_from(["ok", "ok", "failed", "timeout"]))
    if status != "ok":
        return {"status": status, "reason": "warm broke", "wall_s": draw(finite)}
    return {"status": "ok", "wall_s": draw(finite), "first_call_s": draw(finite), "compile_s": draw(finite),
            "dynamo_s": draw(finite), "max_abs_err": draw(finite), "compiled_pieces": 0,
            "cache_hits": draw(st.integers(0, 10)), "warm_start": draw(st.sampled_from(["loaded", "fallback: x", None]))}


@settings(max_examples=60, deadline=None)
@given(cold=cold_fragments(), warm=warm_fragments(), mode=st.sampled_from(MODES), layers=st.integers(1, 128),
       rel=st.floats(1e-4, 1.0))
def test_merged_rows_validate_and_status_follows_the_measurements(cold, warm, mode, layers, rel) -> None:
    row = merge("llama", layers, mode, cold, warm if cold["status"] == "ok" else None, rel, 60.0)
    validate_row(row)
    json.loads(json.dumps(row))  # plain JSON types only
    assert row["trace"] == cold.get("trace") and row["num_regions"] == cold.get("num_regions")
    assert row["cold_warm_start"] == cold.get("warm_start")
    if cold["status"] != "ok":
        assert row["status"] == cold["status"] and row["reason"] == cold["reason"] and row["warm_status"] is None
    elif warm["status"] != "ok":
        assert row["status"] == warm["status"] and row["reason"].startswith("warm: ")
        assert row["first_call_s"] == cold["first_call_s"]  # the cold figures are kept
    else:
        tol = rel * max(1.0, cold["ref_max_abs"])
        worst = max(cold["max_abs_err"], warm["max_abs_err"])
        assert row["status"] == ("mismatch" if worst > tol else "ok")
        assert row["tolerance"] == pytest.approx(tol)
        assert row["warm_start_s"] == warm["first_call_s"] and row["warm_cache_hits"] == warm["cache_hits"]
        assert row["warm_dynamo_s"] == warm["dynamo_s"] and row["warm_warm_start"] == warm["warm_start"]
        assert row["warm_wall_s"] == warm["wall_s"] and row["cold_wall_s"] == cold["wall_s"]
        assert row["cold_timeline"] == cold.get("timeline") and row["warm_timeline"] == warm.get("timeline")
        assert row["step_speedup"] == pytest.approx(cold["step_ms_eager"] / cold["step_ms_compiled"])
        if "fusion_matches" in cold:
            fm = cold["fusion_matches"]  # clean-up passes are not fusions
            assert row["fusion_matches_total"] == fm.get("fuse_norm_quant", 0) + fm.get("fuse_moe", 0)


def test_fusion_total_counts_fusion_passes_only() -> None:
    assert fusion_total({"fuse_attn_quant": 3, "MoEFusion": 2, "fix_functionalization": 7, "noop_elimination": 1}) == 5


def test_skipped_rows_say_why_and_validate() -> None:
    row = skipped_row("moe", 80, "regional", "timed out at 8 layers")
    validate_row(row)
    assert (row["status"], row["reason"], row["first_call_s"]) == ("skipped", "timed out at 8 layers", None)
