"""results.json schema: rows built by the sweep validate, corrupted rows are rejected, and the
table / plots render what the rows say. One slow case runs a real cold + warm measurement."""

from __future__ import annotations

import json
import os
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerpass.bench import sweep
from layerpass.bench.measure import MODES
from layerpass.bench.sweep import ROW_FIELDS, STATUSES, merge, skipped_row, validate_results, validate_row
from layerpass.cli import markdown_table

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
        assert row["step_speedup"] == pytest.approx(cold["step_ms_eager"] / cold["step_ms_compiled"])
        if "fusion_matches" in cold:
            fm = cold["fusion_matches"]  # clean-up passes are not fusions
            assert row["fusion_matches_total"] == fm.get("fuse_norm_quant", 0) + fm.get("fuse_moe", 0)


def _valid_row() -> dict:
    cold = {"status": "ok", "wall_s": 3.0, "dynamo_s": 1.0, "compile_s": 2.0, "first_call_s": 3.1, "max_abs_err": 0.0,
            "ref_max_abs": 2.0, "step_ms_compiled": 1.0, "step_ms_eager": 2.0, "step_ms_compiled_min": 0.9,
            "step_ms_eager_min": 1.8, "repeats": 5, "pieces": 4, "unique_pieces": 4, "compiled_pieces": 4,
            "fusion_matches": {"fuse_norm_quant": 2}, "trace": "regions", "num_regions": 2, "warm_start": "saved"}
    warm = {"status": "ok", "wall_s": 1.0, "first_call_s": 0.5, "compile_s": 0.3, "dynamo_s": 0.0, "max_abs_err": 0.0,
            "compiled_pieces": 0, "cache_hits": 4, "warm_start": "loaded"}
    return merge("llama", 2, "layerpass", cold, warm, 0.05, 60.0)


CORRUPTIONS = {
    "drop a field": lambda r, k: r.pop(k),
    "add a field": lambda r, k: r.__setitem__(k + "_extra", 1),
    "wrong type": lambda r, k: r.__setitem__(k, [1]),
}


@settings(max_examples=40, deadline=None)
@given(field=st.sampled_from(sorted(ROW_FIELDS)), how=st.sampled_from(sorted(CORRUPTIONS)))
def test_corrupted_rows_are_rejected_naming_the_field(field, how) -> None:
    row = _valid_row()
    validate_row(row)
    CORRUPTIONS[how](row, field)
    with pytest.raises(ValueError, match=field):
        validate_row(row)


def test_semantic_checks() -> None:
    for change, message in (({"status": "great"}, "status"), ({"mode": "jit"}, "mode"), ({"layers": 0}, "layers"),
                            ({"status": "failed", "reason": None}, "reason"), ({"first_call_s": None}, "lacks"),
                            ({"fusion_matches": {"x": "1"}}, "fusion_matches"), ({"compile_s": -1.0}, "compile_s"),
                            ({"pieces": True}, "pieces"), ({"num_regions": -1}, "num_regions"),
                            ({"warm_dynamo_s": -0.5}, "warm_dynamo_s")):
        row = _valid_row()
        row.update(change)
        with pytest.raises(ValueError, match=message):
            validate_row(row)
    for status in STATUSES:
        if status not in ("ok", "mismatch"):
            validate_row(skipped_row("moe", 80, "regional", "why") | {"status": status})


def test_document_validation() -> None:
    doc = {"schema_version": sweep.SCHEMA_VERSION, "created": "now", "machine": {}, "config": {}, "wall_s": 1.0,
           "rows": [_valid_row(), skipped_row("moe", 8, "inductor", "timed out at 2 layers")], "ratios": []}
    validate_results(doc)
    with pytest.raises(ValueError, match="ratio"):
        validate_results({**doc, "ratios": [{"key": "x"}]})
    with pytest.raises(ValueError, match="ratios"):
        validate_results({**doc, "ratios": {}})
    with pytest.raises(ValueError, match="schema_version"):
        validate_results({**doc, "schema_version": 99})
    with pytest.raises(ValueError, match="lacks"):
        validate_results({k: v for k, v in doc.items() if k != "machine"})


def test_table_shows_every_row_and_the_reasons() -> None:
    doc = {"rows": [_valid_row(), skipped_row("moe", 8, "regional", "AssertionError: subgraph args")],
           "machine": {"cpu": "cpu-x", "cpu_count": 2, "torch": "2.13.0"}, "wall_s": 12.0}
    table = markdown_table(doc)
    lines = table.splitlines()
    assert lines[0] == ("| model | layers | mode | status | cold first call s | dynamo s (cold) | compile s (cold) | "
                        "warm first call s | dynamo s (warm) | traced | warm path | pieces (unique / compiled) | fusions | "
                        "max abs err | step ms compiled / eager |")
    assert ("| llama | 2 | layerpass | ok | 3.1 | 1.0 | 2.0 | 0.5 | 0.0 | regions (2) | loaded | 4 (4 / 4) | 2 | "
            "0.0e+00 | 1.00 / 2.00 |") in lines
    assert "excluding" in table or "not included" in table  # the legend says what "first call" is
    assert "| moe | 8 | regional | skipped |" in table
    assert "**skipped**: AssertionError: subgraph args" in table and "cpu-x" in table


def test_speedups_and_plots() -> None:
    from layerpass.bench.plots import speedups

    rows = []
    for layers, lp, ind in ((2, 10.0, 20.0), (8, 12.0, 60.0)):
        for mode, t in (("layerpass", lp), ("inductor", ind)):
            r = _valid_row()
            r.update({"layers": layers, "mode": mode, "first_call_s": t})
            rows.append(r)
    rows.append(skipped_row("llama", 32, "layerpass", "budget"))
    assert sorted(speedups(rows)) == [("llama", "layerpass", 2, 2.0), ("llama", "layerpass", 8, 5.0)]
    pytest.importorskip("matplotlib")
    from layerpass.bench.plots import make_plots

    with tempfile.TemporaryDirectory() as d:
        paths = make_plots({"rows": rows}, d)
        for p in paths:
            with open(p, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_real_measurement_row(tmp_path) -> None:
    """A real cold + warm measurement (fresh processes, empty caches) yields a valid, numerically right row."""
    cfg = sweep.SweepConfig(models=("llama",), layers=(2,), modes=("layerpass",), out_dir=str(tmp_path), repeats=3)
    doc = sweep.run_sweep(cfg)
    with open(os.path.join(tmp_path, "results.json")) as f:
        assert json.load(f) == json.loads(json.dumps(doc))
    (row,) = doc["rows"]
    assert row["status"] == "ok", row["reason"]
    assert row["max_abs_err"] <= 1e-4 and row["warm_max_abs_err"] <= 1e-4
    assert row["compiled_pieces"] == row["unique_pieces"] >= 1
    assert row["warm_compiled_pieces"] == 0
    assert row["timeout_s"] == sweep.timeout_for(2)
    # the backend's report fields are recorded as they are (None only on a backend without them)
    assert row["trace"] in ("regions", "whole-model", None)
    ws = row["warm_warm_start"]
    assert ws is None or ws in ("loaded", "saved", "off") or ws.startswith("fallback"), ws
    assert (row["warm_dynamo_s"] or 0.0) <= row["dynamo_s"] + 1.0
