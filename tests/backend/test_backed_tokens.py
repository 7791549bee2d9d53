"""A decoder layer that branches on its token count still runs as regions (issue 29: Doge,
DeepSeek-V4): its trace with the count unbacked fails (a data-dependent guard, a graph break
under ``fullgraph``), so the region is traced again with the count backed. Each side of the
branch is then a guard of its region: a count on the other side traces one region more, a count
on a side already traced none; the layers share their side's region (depth-free), every output
equals eager, and a second compile of the model loads both regions (warm start)."""

from __future__ import annotations

import torch
from torch import nn

import layerpass
from layerpass.backend.config import CompilationConfig
from tests.backend.regions.test_router import CountTraces
from tests.helpers import backend as bh

BRANCH_AT = 6  # the layer takes another path above this many tokens


class BranchesOnTokens(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if x.shape[0] > BRANCH_AT:  # with the count unbacked: "could not guard on u0 > 6"
            return x + torch.relu(h)
        return x - 0.5 * h


def _model(layers: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return bh.Chain([BranchesOnTokens() for _ in range(layers)]).eval()


def _step(compiled: layerpass.CompiledModel, model: nn.Module, tokens: int) -> tuple[layerpass.CompileReport, int]:
    x = torch.randn(tokens, 8)
    with torch.no_grad(), CountTraces() as traces:
        out = compiled(x)
        bh.assert_matches(out, model(x), f"{tokens} tokens")
    return layerpass.last_compile_report(), traces.count


def test_a_layer_branching_on_its_token_count_is_a_region_per_side() -> None:
    model = _model()
    cache_dir = bh.fresh_cache_dir("backed-tokens")
    compiled = layerpass.compile(model, CompilationConfig(cache_dir=cache_dir))

    report, traces = _step(compiled, model, 4)  # below the branch: the unbacked trace fails, then backed
    assert report.trace == "regions" and report.num_regions == 1, (report.trace, report.notes)
    assert traces == 2, traces  # one failed (unbacked) + one backed, for all 3 layers
    assert any("token count backed" in n and "u0 > 6" in n for n in report.notes), report.notes

    report, traces = _step(compiled, model, 9)  # the other side: one backed trace (the class is known)
    assert report.trace == "regions" and traces == 1, (report.trace, traces)
    assert compiled.regions is not None and len(compiled.regions.regions) == 2

    for tokens in (3, 5, 7, 12):  # both sides traced: their guards hold, no trace
        report, traces = _step(compiled, model, tokens)
        assert report.trace == "regions" and traces == 0, (tokens, traces)
    assert compiled.recompiles == 1

    again = layerpass.compile(_model(), CompilationConfig(cache_dir=cache_dir))  # a warm start: both loaded
    for tokens in (4, 9):
        report, traces = _step(again, model, tokens)
        assert report.warm_start == "loaded" and traces == 0, (tokens, report.warm_start, traces)


def test_a_layer_that_does_not_branch_keeps_the_unbacked_count() -> None:
    """The retry is only for a failed unbacked trace: an ordinary layer is traced once, unbacked
    (one region for every count), with no note about a backed count."""
    model = bh.Stack(3).eval()
    compiled = layerpass.compile(model, CompilationConfig(cache_dir=bh.fresh_cache_dir("unbacked-tokens")))
    with torch.no_grad(), CountTraces() as traces:
        compiled(torch.randn(5, 8))
        compiled(torch.randn(9, 8))
    report = layerpass.last_compile_report()
    assert traces.count == 1 and report.num_regions == 1
    assert not any("token count backed" in n for n in report.notes), report.notes
    assert compiled.regions is not None and not compiled.regions.backed_tokens
