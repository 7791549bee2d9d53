"""``layerpass.compile`` (``backend/compiled_model.py``): which path a model takes, and its reports.

- Repeated layers: regions (``test_regions.py`` covers them); a report is published for a call
  that compiled something, with the INFO summary line, and not for a call that only ran.
- The whole model through ``torch.compile`` instead, with a note saying why: no repeated layers,
  a torch without the AOT API, a layer with a graph break (after one eager step), training mode.

Observed only through the compiled model's outputs and the published reports.
"""

from __future__ import annotations

import logging
from unittest import mock

import pytest
import torch
from torch import nn

import layerpass
from layerpass.backend import compiled_model as cm
from layerpass.backend.config import CompilationConfig
from layerpass.backend.report.compile_report import num_compile_reports
from tests.helpers import backend as bh


def run_compiled(model: nn.Module, x: torch.Tensor, tag: str) -> layerpass.CompileReport:
    """``layerpass.compile(model)`` called once on ``x`` (asserted equal to eager); its report."""
    with torch.no_grad():
        ref = model(x)
        compiled = layerpass.compile(model, CompilationConfig(cache_dir=bh.fresh_cache_dir(tag)))
        torch.testing.assert_close(compiled(x), ref, atol=1e-5, rtol=1e-5)
    return layerpass.last_compile_report()


# ---------------------------------------------------------------- regions: reports
def test_compile_report_and_info_summary_line(caplog) -> None:
    caplog.set_level(logging.INFO, logger="layerpass")
    model = bh.Stack(4, seed=1).eval()
    x = torch.randn(5, 8)
    compiled = layerpass.compile(model, CompilationConfig(cache_dir=bh.fresh_cache_dir("info")))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
        x7 = torch.randn(7, 8)
        torch.testing.assert_close(compiled(x7), model(x7))
    r = layerpass.last_compile_report()
    lines = [m for m in caplog.messages if bh.SUMMARY_RE.fullmatch(m)]
    assert lines, caplog.messages
    n, u, c, h, secs = bh.SUMMARY_RE.fullmatch(lines[-1]).groups()
    assert (int(n), int(u), int(c), int(h)) == (r.num_pieces, r.num_unique_pieces, r.num_compiled, r.num_cache_hits)
    assert float(secs) == pytest.approx(r.total_s, abs=0.006)
    assert r.num_pieces == 4 and r.num_compiled == r.num_unique_pieces and r.num_cache_hits == 0  # a piece per layer
    assert r.dynamo_s >= 0 and r.compile_s > 0 and r.total_s >= r.compile_s and r.recompiles == 0
    assert isinstance(r.matches, dict)
    assert compiled.recompiles == 0


def test_a_call_that_compiles_nothing_publishes_no_report() -> None:
    """The last report stays the last compile's: steps that only run (a new token count included:
    the token dimension is dynamic) add none."""
    model = bh.Stack(3).eval()
    compiled = layerpass.compile(model, CompilationConfig(cache_dir=bh.fresh_cache_dir("quiet")))
    with torch.no_grad():
        before = num_compile_reports()
        compiled(torch.randn(5, 8))
        assert num_compile_reports() == before + 1
        first = layerpass.last_compile_report()
        for tokens in (5, 9, 1):
            x = torch.randn(tokens, 8)
            torch.testing.assert_close(compiled(x), model(x))
    assert num_compile_reports() == before + 1 and layerpass.last_compile_report() is first
    assert first.trace == "regions" and first.num_regions == 1 and first.num_pieces == 3


# ---------------------------------------------------------------- the whole model instead
def test_model_without_repeated_layers_compiles_whole() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    report = run_compiled(model, torch.randn(5, 8), "no-layers")
    assert report.trace == "whole-model" and report.num_compiled >= 1
    assert any("no repeated layers" in n for n in report.notes), report.notes


def test_torch_without_the_aot_api_compiles_whole_and_says_why() -> None:
    lacks = "torch 2.10 lacks torch.compiler.load_compiled_function"
    with mock.patch.object(cm, "aot_api_missing", lambda: lacks):
        report = run_compiled(bh.Stack(3).eval(), torch.randn(5, 8), "no-aot")
    assert report.trace == "whole-model"
    assert report.warm_start == f"off: {lacks}"
    assert any(lacks in n for n in report.notes), report.notes


class Breaks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        torch._dynamo.graph_break()
        return torch.relu(h) + x


def test_a_layer_with_a_graph_break_falls_back_to_the_whole_model(caplog) -> None:
    """A graph break (the only reason to leave regions): the first step finishes eagerly, says so
    in its report, and the next ones run the whole model through the backend."""
    caplog.set_level("WARNING", logger="layerpass")
    model = bh.Chain([Breaks(), Breaks()]).eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        ref = model(x)
        compiled = layerpass.compile(model, CompilationConfig(cache_dir=bh.fresh_cache_dir("fallback")))
        torch.testing.assert_close(compiled(x), ref)
        first = layerpass.last_compile_report()  # the fallback step has a report of its own
        assert first.trace.startswith("eager") and any("cannot be traced as a region" in n for n in first.notes)
        torch.testing.assert_close(compiled(x), ref)
    report = layerpass.last_compile_report()
    assert report.trace == "whole-model" and any("cannot be traced as a region" in n for n in report.notes)
    assert any("cannot be traced as a region" in m for m in caplog.messages), caplog.messages


class DropoutBlock(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(torch.relu(self.lin(x))) + x


def test_training_mode_compiles_the_whole_model_with_a_warning(caplog) -> None:
    caplog.set_level("WARNING", logger="layerpass")
    model = bh.Chain([DropoutBlock(), DropoutBlock()])
    x = torch.randn(5, 8)
    compiled = layerpass.compile(model, CompilationConfig(cache_dir=bh.fresh_cache_dir("train")))
    model.train()
    for _ in range(2):
        out = compiled(x)
        assert out.shape == model(x).shape and torch.isfinite(out).all()
    assert any("training mode" in m for m in caplog.messages), caplog.messages
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    assert layerpass.last_compile_report().trace == "regions"


def test_the_whole_model_path_never_marks_the_callers_tensors() -> None:
    """Before: the whole-model path marked the caller's inputs unbacked in place, so another
    compiled model given the same tensors traced 2 regions and recompiled per batch size."""
    inputs = [torch.randn(n, 8) for n in (5, 7)]
    whole = layerpass.compile(bh.Chain([bh.Block(8)]).eval(), CompilationConfig(disable_cache=True))
    with torch.no_grad():
        for x in inputs:
            whole(x)
    assert whole.regions is None and whole.backend.num_calls == 1  # whole model, dynamic tokens
    for x in inputs:
        assert not getattr(x, "_dynamo_unbacked_indices", None) and not getattr(x, "_dynamo_dynamic_indices", None)
    fresh = layerpass.compile(bh.Chain([bh.Block(8), bh.Block(8)]).eval(),
                              CompilationConfig(cache_dir=bh.fresh_cache_dir("unmarked")))
    with torch.no_grad():
        for x in inputs:
            bh.assert_matches(fresh(x), fresh.model(x))
    report = layerpass.last_compile_report()
    assert (report.num_regions, fresh.recompiles) == (1, 0), (report.num_regions, fresh.recompiles)


class _GraphBreak(nn.Module):
    """No repeated layers, one graph break: the whole model in two Dynamo graphs (as T5 is)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        torch._dynamo.graph_break()
        return self.b(x)


def test_recompiles_and_graph_breaks_are_counted_apart() -> None:
    """Before: every graph-break piece counted as a recompile (T5: ``recompiles=6`` for 2 calls)."""
    torch.compiler.reset()
    model = _GraphBreak().eval()
    compiled = layerpass.compile(model, CompilationConfig(disable_cache=True))
    x = torch.randn(5, 8)
    with torch.no_grad():
        bh.assert_matches(compiled(x), model(x))
    report = layerpass.last_compile_report()
    assert compiled.backend.num_calls == 2  # two graphs, one per side of the break
    assert (report.graph_breaks, report.recompiles, compiled.recompiles) == (1, 0, 0), report
    with torch.no_grad():
        bh.assert_matches(compiled(x), model(x))  # the same sizes: nothing is compiled again
    assert compiled.recompiles == 0 and compiled.backend.num_calls == 2
