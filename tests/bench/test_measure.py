"""``bench/measure.py`` without compiling: its checks, the compile report's fields, the failure
reasons, and the Inductor baseline reached by its public backend name."""

from __future__ import annotations

import pathlib
import sys
from types import SimpleNamespace

import pytest

from layerpass.bench import measure

BENCH = pathlib.Path(measure.__file__).parent


def _report(**kw) -> SimpleNamespace:
    base = dict(matches={"fuse_norm_quant": 2}, dynamo_s=1.0, compile_s=2.0, total_s=3.0, num_pieces=10,
                num_unique_pieces=4, num_compiled=4, num_cache_hits=0, pass_failures=[])
    return SimpleNamespace(**{**base, **kw})


def test_layerpass_stats_read_the_report_fields_defensively(monkeypatch) -> None:
    import layerpass.backend.report.compile_report as report

    monkeypatch.setattr(report, "compile_reports", lambda since=None: [_report()])  # a backend without the new fields
    stats = measure._layerpass_stats(0)
    assert (stats["trace"], stats["num_regions"], stats["warm_start"]) == (None, None, None)
    assert stats["dynamo_s"] == 1.0 and stats["total_s"] == 3.0 and stats["timeline"] == []
    from layerpass.backend.report.timeline import Span

    monkeypatch.setattr(report, "compile_reports", lambda since=None: [_report(timeline=[Span("compile piece x", 1.0, 3.0)])])
    assert measure._layerpass_stats(0)["timeline"] == [{"what": "compile piece x", "start_s": 1.0, "end_s": 3.0,
                                                         "duration_s": 2.0}]
    monkeypatch.setattr(report, "compile_reports",
                        lambda since=None: [_report(trace="regions", num_regions=2, warm_start="loaded")])
    assert measure._layerpass_stats(0)["trace"] == "regions" and measure._layerpass_stats(0)["num_regions"] == 2
    monkeypatch.setattr(report, "compile_reports", lambda since=None: [  # two graphs that disagree
        _report(trace="regions", num_regions=2, warm_start="saved"),
        _report(trace="whole-model", num_regions=0, warm_start="fallback: no API")])
    stats = measure._layerpass_stats(0)
    assert stats["trace"] == "regions; whole-model" and stats["num_regions"] == 2
    assert stats["warm_start"] == "saved; fallback: no API" and stats["dynamo_s"] == 2.0
    monkeypatch.setattr(report, "compile_reports", lambda since=None: [])
    with pytest.raises(RuntimeError, match="no compile report"):
        measure._layerpass_stats(0)


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "jit"}, "unknown mode 'jit'"), ({"phase": "hot"}, "unknown phase 'hot'"),
    ({"repeats": 0}, "repeats must be >= 1"),
])
def test_bad_arguments_are_refused_before_any_work(kwargs: dict, message: str) -> None:
    args = {"model_name": "llama", "layers": 2, "mode": "inductor", "phase": "cold", **kwargs}
    repeats = args.pop("repeats", 20)
    with pytest.raises(ValueError, match=message):
        measure.measure(**args, repeats=repeats)


def test_failure_reasons_are_short_and_skip_torch_boilerplate() -> None:
    exc = RuntimeError("subgraph args must have consistent values!\n\nSet TORCHDYNAMO_VERBOSE=1 for more\nsecond line")
    assert measure._reason(exc) == "RuntimeError: subgraph args must have consistent values! | second line"
    assert len(measure._reason(ValueError("x" * 1000))) == 300


def test_the_inductor_baseline_is_the_backend_named_inductor() -> None:
    import torch._dynamo

    backend = measure.inductor_backend()
    assert backend is torch._dynamo.lookup_backend("inductor") and backend.__name__ == "inductor"
    # the bench reaches Inductor by its public name only: no private entry point anywhere in bench/
    assert not [p.name for p in BENCH.glob("*.py") if "compile_fx" in p.read_text()]


def test_inductor_modules_are_imported_before_the_clock() -> None:
    assert measure._import_inductor() >= 0.0
    assert "torch._inductor.codecache" in sys.modules and "torch._inductor.standalone_compile" in sys.modules
