"""``bench/summary.py``: the acceptance ratios from a run's rows, and the Markdown table with its legend."""

from __future__ import annotations

import pytest

from layerpass.bench import summary
from layerpass.bench.rows import skipped_row
from layerpass.bench.schema import empty_row
from tests.bench.fakes import valid_row


def _row(model: str, layers: int, mode: str, cold: float, warm: float, dynamo: float = 1.0, status: str = "ok") -> dict:
    row = empty_row(model, layers, mode)
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


def test_table_shows_every_row_and_the_reasons() -> None:
    doc = {"rows": [valid_row(), skipped_row("moe", 8, "regional", "AssertionError: subgraph args")],
           "machine": {"cpu": "cpu-x", "cpu_count": 2, "torch": "2.13.0"}, "wall_s": 12.0}
    table = summary.markdown_table(doc)
    lines = table.splitlines()
    assert lines[0] == ("| model | layers | mode | status | cold first call s | dynamo s (cold) | compile s (cold) | "
                        "warm first call s | dynamo s (warm) | traced | warm path | pieces (unique / compiled) | fusions | "
                        "max abs err | step ms compiled / eager |")
    assert ("| llama | 2 | layerpass | ok | 3.1 | 1.0 | 2.0 | 0.5 | 0.0 | regions (2) | loaded | 4 (4 / 4) | 2 | "
            "0.0e+00 | 1.00 / 2.00 |") in lines
    assert "excluding" in table or "not included" in table  # the legend says what "first call" is
    assert "| moe | 8 | regional | skipped |" in table
    assert "**skipped**: AssertionError: subgraph args" in table and "cpu-x" in table
