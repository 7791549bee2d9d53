"""``bench/sweep.py``, the scheduler, without real measurements: every row measured (no sweep budget),
one at a time by default, written as it comes; a hung (model, mode) skips only its larger rows. One
slow case runs a real cold + warm measurement."""

from __future__ import annotations

import json
import os

import pytest

from layerpass.bench import summary, sweep
from layerpass.bench.config import SweepConfig, timeout_for
from layerpass.bench.presets import preset_units
from layerpass.bench.runner import CacheDirs, FreshRun
from layerpass.bench.schema import validate_results
from tests.bench.fakes import FakeMeasure


def test_every_row_is_measured_one_at_a_time_and_written_as_it_comes(tmp_path, monkeypatch) -> None:
    cfg = SweepConfig(out_dir=str(tmp_path))
    fake = FakeMeasure(str(tmp_path))
    monkeypatch.setattr(sweep, "measure_phase", fake)
    rows_written: list[int] = []
    doc = sweep.run_sweep(cfg, on_row=lambda row: rows_written.append(len(json.load(open(tmp_path / "results.json"))["rows"])))
    assert fake.most == 1  # one measurement at a time
    assert [c[:4] for c in fake.calls] == [(m, n, mode, ph) for m, n, mode in preset_units("default") for ph in ("cold", "warm")]
    assert all(c[4] == timeout_for(c[1]) for c in fake.calls)
    assert fake.rows_seen == list(range(20)) and rows_written == list(range(1, 21))  # each row on disk when known
    assert len(doc["rows"]) == 20 and {r["status"] for r in doc["rows"]} == {"ok"}
    validate_results(doc)
    on_disk = json.load(open(tmp_path / "results.json"))
    assert on_disk == json.loads(json.dumps(doc))
    assert on_disk["config"]["sweep"] == "default" and on_disk["config"]["timeouts_s"]["80"] == 1900
    # table order: model, layers, then mode
    assert [(r["model"], r["layers"], r["mode"]) for r in doc["rows"]][:6] == [
        ("llama", 2, "layerpass"), ("llama", 2, "layerpass-str"), ("llama", 2, "inductor"), ("llama", 2, "regional"),
        ("llama", 8, "layerpass"), ("llama", 8, "layerpass-str")]
    row = next(r for r in doc["rows"] if (r["model"], r["layers"], r["mode"]) == ("llama", 80, "layerpass"))
    assert (row["trace"], row["num_regions"], row["cold_warm_start"], row["warm_warm_start"]) == ("regions", 2, "saved", "loaded")
    keys = {(r["key"], r["model"]) for r in doc["ratios"]}
    assert keys == {(k, m) for k, m, *_ in summary.RATIO_SPECS}
    md = (tmp_path / "results.md").read_text()
    assert "Acceptance ratios" in md and "| llama | 80 | inductor | ok |" in md


def test_a_hung_measurement_skips_only_the_larger_rows_of_its_model_and_mode(tmp_path, monkeypatch) -> None:
    cfg = SweepConfig(preset="quick", out_dir=str(tmp_path), jobs=2)
    fake = FakeMeasure(str(tmp_path), hang={("llama", 2, "inductor")}, delay=0.05)
    monkeypatch.setattr(sweep, "measure_phase", fake)
    doc = sweep.run_sweep(cfg)
    got = {(r["layers"], r["mode"]): (r["status"], r["reason"]) for r in doc["rows"]}
    assert got == {(2, "layerpass"): ("ok", None), (2, "inductor"): ("timeout", "cold run exceeded 340 s"),
                   (80, "layerpass"): ("ok", None), (80, "inductor"): ("skipped", "timed out at 2 layers")}
    assert fake.most <= 2
    assert [r["key"] for r in doc["ratios"]] == ["cold_deep_vs_shallow", "dynamo_deep_vs_shallow", "warm_vs_cold"]


def test_plan_and_table_order() -> None:
    cfg = SweepConfig(models=("llama",), layers=(8, 2), modes=("inductor", "layerpass"))
    assert sweep.plan(cfg) == [("llama", 2, "inductor"), ("llama", 2, "layerpass"), ("llama", 8, "inductor"),
                               ("llama", 8, "layerpass")]
    assert sweep.table_order(cfg, [("llama", 8, "layerpass"), ("llama", 2, "layerpass"), ("llama", 2, "inductor")]) == [
        ("llama", 2, "inductor"), ("llama", 2, "layerpass"), ("llama", 8, "layerpass")]


def test_a_measurement_process_is_measure_py_on_the_row_caches(monkeypatch) -> None:
    cfg = SweepConfig(repeats=3, threads=2, imports=("my.models",), extra_env={"X": "1"})
    calls = []

    def fake_run(args, caches, *, use_layername, timeout_s, env):
        calls.append((args, caches, use_layername, timeout_s, env))
        return outcomes.pop(0)

    outcomes = [FreshRun(False, 0, 2.0, {"status": "ok", "first_call_s": 1.0}, "", ""),
                FreshRun(True, None, 9.0, None, "", ""),
                FreshRun(False, -11, 3.0, None, "starting\n", "Traceback ...\nSegmentation fault\n")]
    monkeypatch.setattr(sweep, "run_fresh", fake_run)
    caches = CacheDirs("/c/lp", "/c/ind")
    assert sweep.measure_phase(cfg, ("moe", 8, "layerpass-str"), "warm", caches, 99.0) == \
        {"status": "ok", "first_call_s": 1.0, "wall_s": 2.0}
    args, got_caches, use_layername, timeout_s, env = calls[0]
    assert args == ["-m", "layerpass.bench.measure", "--model", "moe", "--layers", "8", "--mode", "layerpass-str",
                    "--phase", "warm", "--repeats", "3", "--threads", "2", "--import", "my.models"]
    assert (got_caches, use_layername, timeout_s) == (caches, False, 99.0)
    assert env == {"X": "1", "OMP_NUM_THREADS": "2", "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    assert sweep.measure_phase(cfg, ("moe", 8, "layerpass"), "cold", caches, 99.0) == \
        {"status": "timeout", "reason": "cold run exceeded 99 s", "wall_s": 9.0}
    assert calls[1][2] is True  # the layer-name switch is on in every mode but layerpass-str
    assert sweep.measure_phase(cfg, ("moe", 8, "inductor"), "cold", caches, 99.0) == \
        {"status": "failed", "reason": "cold process exited with code -11: Segmentation fault", "wall_s": 3.0}


@pytest.mark.slow
def test_real_measurement_row(tmp_path) -> None:
    """A real cold + warm measurement (fresh processes, empty caches) yields a valid, numerically right row."""
    cfg = SweepConfig(models=("llama",), layers=(2,), modes=("layerpass",), out_dir=str(tmp_path), repeats=3)
    doc = sweep.run_sweep(cfg)
    with open(os.path.join(tmp_path, "results.json")) as f:
        assert json.load(f) == json.loads(json.dumps(doc))
    (row,) = doc["rows"]
    assert row["status"] == "ok", row["reason"]
    assert row["max_abs_err"] <= 1e-4 and row["warm_max_abs_err"] <= 1e-4
    assert row["compiled_pieces"] == row["unique_pieces"] >= 1
    assert row["warm_compiled_pieces"] == 0
    assert row["timeout_s"] == timeout_for(2)
    # the backend's report fields are recorded as they are (None only on a backend without them)
    assert row["trace"] in ("regions", "whole-model", None)
    ws = row["warm_warm_start"]
    assert ws is None or ws in ("loaded", "saved", "off") or ws.startswith("fallback"), ws
    assert (row["warm_dynamo_s"] or 0.0) <= row["dynamo_s"] + 1.0
