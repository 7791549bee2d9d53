"""The sweep's plan and scheduling, without real measurements: presets, per-measurement time limits
scaled to size (no sweep budget), one measurement at a time by default, rows written as they come,
the report fields of ``measure.py``, the acceptance ratios and the ``layerpass bench`` options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from layerpass.bench import measure, summary, sweep
from layerpass.bench.sweep import SweepConfig, preset_units, timeout_for, validate_results
from layerpass.cli import main


# ---- presets and the plan -------------------------------------------------------------------------

def test_presets() -> None:
    quick = preset_units("quick")
    assert quick == (("llama", 2, "layerpass"), ("llama", 2, "inductor"), ("llama", 80, "layerpass"),
                     ("llama", 80, "inductor"))
    default = preset_units("default")
    assert len(default) == len(set(default)) == 20
    assert {(n, mode) for m, n, mode in default if m == "llama" and mode in ("layerpass", "inductor")} == \
        {(n, mode) for n in (2, 8, 32, 80) for mode in ("layerpass", "inductor")}
    for model in ("llama-fp8", "moe"):
        assert sorted((n, mode) for m, n, mode in default if m == model) == \
            [(2, "inductor"), (2, "layerpass"), (80, "inductor"), (80, "layerpass")]
    assert sorted((n, mode) for m, n, mode in default if mode in ("layerpass-str", "regional")) == \
        [(2, "layerpass-str"), (2, "regional"), (8, "layerpass-str"), (8, "regional")]
    assert default[:8] == tuple(("llama", n, mode) for n in (2, 8, 32, 80) for mode in ("layerpass", "inductor"))
    full = preset_units("full")
    assert len(full) == 48 and set(default) <= set(full) and set(quick) <= set(default)
    for units in (quick, default, full):  # each (model, mode) runs its layer counts in increasing order
        for model, _, mode in units:
            seq = [n for m, n, md in units if (m, md) == (model, mode)]
            assert seq == sorted(seq)


def test_config_resolution() -> None:
    assert SweepConfig().units == preset_units("default") and SweepConfig().sweep_name == "default"
    assert SweepConfig(preset="quick").units == preset_units("quick")
    custom = SweepConfig(models=("moe",))  # the rest from the preset: layers 2,8,32,80, layerpass vs inductor
    assert custom.units == tuple(("moe", n, mode) for n in (2, 8, 32, 80) for mode in ("layerpass", "inductor"))
    assert custom.sweep_name == "custom"
    assert SweepConfig(preset="quick", modes=("layerpass",)).units == (("llama", 2, "layerpass"), ("llama", 80, "layerpass"))
    assert SweepConfig(preset="full", models=("llama",), layers=(2,)).modes == measure.MODES
    cfg = SweepConfig(models=("llama",), layers=(8, 2), modes=("inductor", "layerpass"))
    assert sweep.plan(cfg) == [("llama", 2, "inductor"), ("llama", 2, "layerpass"), ("llama", 8, "inductor"),
                               ("llama", 8, "layerpass")]
    assert cfg.layers == (2, 8) and cfg.modes == ("inductor", "layerpass")
    for bad, message in (({"modes": ("jit",)}, "unknown or no modes"), ({"layers": (0,)}, "positive"),
                         ({"preset": "huge"}, "preset"), ({"timeout_s": 0}, "timeout"), ({"timeout_scale": -1}, "scale"),
                         ({"jobs": 0}, "jobs")):
        with pytest.raises(ValueError, match=message):
            SweepConfig(**bad)
    assert not hasattr(SweepConfig(), "budget_s")  # no sweep budget


def test_time_limits_scale_with_size_and_are_generous() -> None:
    assert timeout_for(2) == 340 and timeout_for(80) == 1900 and timeout_for(80, 2.0) == 3800
    cfg = SweepConfig()
    assert cfg.jobs == 1
    assert [cfg.timeout(n) for n in (2, 8, 32, 80)] == [timeout_for(n) for n in (2, 8, 32, 80)]
    assert SweepConfig(timeout_s=7).timeout(80) == 7 and SweepConfig(timeout_scale=3).timeout(2) == 1020
    # far above what any default row needs on the reference machine (inductor at 80 layers: about 2 minutes)
    assert min(timeout_for(n) / (15 + 1.2 * n) for n in (2, 8, 32, 80)) > 10


# ---- scheduling with a fake measurement ---------------------------------------------------------

def _fragment(model: str, layers: int, mode: str, phase: str) -> dict:
    lp = mode.startswith("layerpass")
    cold_s = {"layerpass": 10.0 + 0.05 * layers, "inductor": 10.0 + layers}.get(mode, 12.0)
    frag = {"status": "ok", "first_call_s": cold_s if phase == "cold" else cold_s / 10, "dynamo_s": 0.5,
            "compile_s": 5.0, "max_abs_err": 0.0, "ref_max_abs": 3.0}
    if phase == "cold":
        frag.update({"step_ms_compiled": 1.0, "step_ms_eager": 1.5, "step_ms_compiled_min": 0.9,
                     "step_ms_eager_min": 1.4, "repeats": 3})
    if lp:
        frag.update({"pieces": layers + 2, "unique_pieces": 4, "compiled_pieces": 4 if phase == "cold" else 0,
                     "cache_hits": 0 if phase == "cold" else 4, "fusion_matches": {},
                     "trace": "regions", "num_regions": 2, "warm_start": "saved" if phase == "cold" else "loaded"})
    return frag


class FakeMeasure:
    """Stands in for ``sweep.measure_phase``: records calls, concurrency and what results.json held."""

    def __init__(self, out_dir: str, hang: set = frozenset(), delay: float = 0.0) -> None:
        self.out_dir, self.hang, self.delay = out_dir, hang, delay
        self.calls: list[tuple] = []
        self.rows_seen: list[int] = []
        self.running = self.most = 0
        self.lock = threading.Lock()

    def __call__(self, cfg, model, layers, mode, phase, cache, inductor_cache, timeout_s):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.calls.append((model, layers, mode, phase, timeout_s))
            path = os.path.join(self.out_dir, "results.json")
            if phase == "cold":
                self.rows_seen.append(len(json.load(open(path))["rows"]) if os.path.exists(path) else 0)
        try:
            time.sleep(self.delay)
            if (model, layers, mode) in self.hang:
                return {"status": "timeout", "reason": f"{phase} run exceeded {timeout_s:.0f} s", "wall_s": timeout_s}
            return {**_fragment(model, layers, mode, phase), "wall_s": 1.0}
        finally:
            with self.lock:
                self.running -= 1


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


def test_run_process_kills_a_hung_process_group(tmp_path) -> None:
    t = time.perf_counter()
    outcome, rc, wall, _ = sweep.run_process([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ),
                                             1.0, str(tmp_path))
    assert outcome == "timeout" and rc is None and wall < 30 and time.perf_counter() - t < 30


# ---- measure.py: the compile report's fields -----------------------------------------------------

def _report(**kw) -> SimpleNamespace:
    base = dict(matches={"fuse_norm_quant": 2}, dynamo_s=1.0, compile_s=2.0, total_s=3.0, num_pieces=10,
                num_unique_pieces=4, num_compiled=4, num_cache_hits=0, pass_failures=[])
    return SimpleNamespace(**{**base, **kw})


def test_layerpass_stats_read_the_report_fields_defensively(monkeypatch) -> None:
    import layerpass.backend.report as report

    monkeypatch.setattr(report, "compile_reports", lambda: [_report()])  # a backend without the new fields
    stats = measure._layerpass_stats(0)
    assert (stats["trace"], stats["num_regions"], stats["warm_start"]) == (None, None, None)
    assert stats["dynamo_s"] == 1.0 and stats["total_s"] == 3.0
    monkeypatch.setattr(report, "compile_reports",
                        lambda: [_report(trace="regions", num_regions=2, warm_start="loaded")])
    assert measure._layerpass_stats(0)["trace"] == "regions" and measure._layerpass_stats(0)["num_regions"] == 2
    monkeypatch.setattr(report, "compile_reports", lambda: [  # two graphs that disagree
        _report(trace="regions", num_regions=2, warm_start="saved"),
        _report(trace="whole-model", num_regions=0, warm_start="fallback: no API")])
    stats = measure._layerpass_stats(0)
    assert stats["trace"] == "regions; whole-model" and stats["num_regions"] == 2
    assert stats["warm_start"] == "saved; fallback: no API" and stats["dynamo_s"] == 2.0
    monkeypatch.setattr(report, "compile_reports", lambda: [])
    with pytest.raises(RuntimeError, match="no compile report"):
        measure._layerpass_stats(0)


# ---- ratios and the markdown ----------------------------------------------------------------------

def _row(model: str, layers: int, mode: str, cold: float, warm: float, dynamo: float = 1.0, status: str = "ok") -> dict:
    row = sweep.empty_row(model, layers, mode)
    row.update({"status": status, "first_call_s": cold, "warm_start_s": warm, "dynamo_s": dynamo,
                "reason": None if status == "ok" else "why"})
    return row


def test_acceptance_ratios() -> None:
    rows = [_row("llama", 2, "layerpass", 20.0, 3.0, dynamo=1.0), _row("llama", 80, "layerpass", 22.0, 3.0, dynamo=3.0),
            _row("llama", 80, "inductor", 110.0, 24.0), _row("llama", 32, "layerpass", 99.0, 9.0, dynamo=99.0),
            _row("llama-fp8", 2, "layerpass", 20.0, 3.0), _row("llama-fp8", 80, "layerpass", 25.0, 3.0),
            _row("llama-fp8", 80, "inductor", 140.0, 30.0, status="failed")]
    got = {(r["key"], r["model"]): r for r in summary.acceptance_ratios(rows)}
    assert set(got) == {("cold_deep_vs_shallow", "llama"), ("dynamo_deep_vs_shallow", "llama"), ("warm_vs_cold", "llama"),
                        ("warm_vs_inductor_warm", "llama"), ("inductor_cold_vs_layerpass_cold", "llama")}
    expect = {"cold_deep_vs_shallow": (1.1, True), "dynamo_deep_vs_shallow": (3.0, True),
              "warm_vs_cold": (3 / 22, True), "warm_vs_inductor_warm": (0.125, True),
              "inductor_cold_vs_layerpass_cold": (5.0, True)}
    for (key, _), r in got.items():
        assert r["value"] == pytest.approx(expect[key][0]) and r["meets"] is expect[key][1]
        assert r["deep"] == 80 and set(r) == set(summary.RATIO_FIELDS)
    assert got["cold_deep_vs_shallow", "llama"]["shallow"] == 2 and got["warm_vs_cold", "llama"]["shallow"] is None
    summary.validate_ratios(list(got.values()))
    rows[1]["first_call_s"] = 30.0  # 1.5x: fails the 1.15x target
    assert {r["key"]: r["meets"] for r in summary.acceptance_ratios(rows)}["cold_deep_vs_shallow"] is False
    # other depths: computed, but the 80-vs-2 targets are not judged
    small = [_row("llama", 2, "layerpass", 20.0, 3.0), _row("llama", 8, "layerpass", 21.0, 3.0)]
    assert [(r["key"], r["meets"]) for r in summary.acceptance_ratios(small)] == [
        ("cold_deep_vs_shallow", None), ("dynamo_deep_vs_shallow", None), ("warm_vs_cold", None)]
    assert summary.acceptance_ratios([_row("llama", 2, "inductor", 1.0, 1.0)]) == []


def test_markdown_has_the_legend_fallbacks_and_ratios() -> None:
    rows = [_row("llama", 2, "layerpass", 20.0, 3.0), _row("llama", 80, "layerpass", 22.0, 3.0)]
    rows[0].update({"cold_warm_start": "fallback: no saved program yet", "warm_warm_start": "loaded"})
    rows[1].update({"trace": "regions", "num_regions": 1, "cold_warm_start": "saved",
                    "warm_warm_start": "fallback: entry checksum mismatch"})
    doc = {"rows": rows, "ratios": summary.acceptance_ratios(rows), "machine": {"cpu": "x", "cpu_count": 2},
           "config": {"sweep": "quick", "jobs": 1, "command": "layerpass bench --quick"}, "wall_s": 5.0}
    md = summary.markdown_table(doc)
    assert "| regions (1) | fallback |" in md
    assert "- llama / 80 layers / layerpass: warm process, warm path **fallback: entry checksum mismatch**" in md
    assert "no saved program yet" not in md  # the cold process has nothing to load: not worth a note
    assert "excluding\n  interpreter start-up, imports" in md  # what "first call" means
    assert "| llama | layerpass cold first call, 80 vs 2 layers | 1.10x (22.00 / 20.00) | <= 1.15 | yes |" in md
    assert "Command: `layerpass bench --quick`." in md and "quick sweep, 1 at a time" in md


# ---- the command line -----------------------------------------------------------------------------

def test_help_documents_the_sweeps_and_jobs() -> None:
    proc = subprocess.run([sys.executable, "-m", "layerpass", "bench", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for flag in ("--quick", "--full", "--jobs", "--timeout", "--timeout-scale", "--docs"):
        assert flag in text
    assert "llama, 2 and 80 layers, layerpass vs inductor" in text and "all four modes" in text
    assert "No sweep budget" in text and "default 1" in text


def test_quick_and_full_exclude_each_other(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["bench", "--quick", "--full"])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_a_sweep_budget_is_refused(capsys, monkeypatch) -> None:
    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **k: pytest.fail("must not run"))
    with pytest.raises(SystemExit) as e:
        main(["bench", "--quick", "--budget", "100"])
    assert e.value.code == 2 and "no sweep budget" in capsys.readouterr().err


def test_cli_quick_with_a_fake_measurement(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sweep, "measure_phase", FakeMeasure(str(tmp_path / "res")))
    out, docs = tmp_path / "res", tmp_path / "docs"
    assert main(["bench", "--quick", "--no-plots", "--out", str(out), "--docs", str(docs), "--budget", "0"]) == 0
    captured = capsys.readouterr()
    doc = json.load(open(out / "results.json"))
    validate_results(doc)
    assert [r["status"] for r in doc["rows"]] == ["ok"] * 4  # a budget never skips a row
    assert doc["config"]["command"] == "layerpass bench --quick --out {} --docs {} --no-plots".format(out, docs)
    assert (docs / "results.md").read_text() == (out / "results.md").read_text()
    assert captured.out.strip() == (out / "results.md").read_text().strip()
    assert "Acceptance ratios" in captured.out
