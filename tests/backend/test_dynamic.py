"""Dynamic token count: a compiled model serves any batch without recompiling; ``compile_sizes``.

The recompile count is read as a delta of the backend's calls, so the tests hold in any order
(and whichever other test of this worker already ran the shared compiled model).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.helpers import backend as bh
from layerpass.models import make_step


@pytest.fixture(scope="module")
def llama2() -> bh.Compiled:
    """Not the memoised compile: the single-token tests may recompile this one."""
    return bh.compile_zoo("llama", 2)


def run_both(c: bh.Compiled, num_decodes: int, prefill_lens: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    step = make_step(c.model, num_decodes=num_decodes, prefill_lens=prefill_lens, seed=seed)
    try:
        return step.run(c.compiled), step.run(c.model)
    finally:
        step.release()


@settings(max_examples=6, deadline=None)
@given(
    num_decodes=st.integers(0, 4),
    prefill_lens=st.lists(st.integers(1, 9), max_size=2),
    seed=st.integers(0, 2**16),
)
def test_new_token_counts_do_not_recompile(llama2: bh.Compiled, num_decodes: int, prefill_lens: list[int], seed: int) -> None:
    tokens = num_decodes + sum(prefill_lens)
    assume(tokens >= 1)
    calls = llama2.compiled.backend.num_calls
    out, ref = run_both(llama2, num_decodes, prefill_lens, seed)
    assert out.shape[0] == tokens
    bh.assert_matches(out, ref, f"{num_decodes} decodes + prefills {prefill_lens}")
    assert llama2.compiled.backend.num_calls == calls, f"a step of {tokens} tokens recompiled"
    assert llama2.report.recompiles == 0


def test_single_token_step_matches_eager_and_any_recompile_is_reported(llama2: bh.Compiled) -> None:
    from layerpass.backend.report.compile_report import compile_reports, num_compile_reports

    calls, mark = llama2.compiled.backend.num_calls, num_compile_reports()
    out, ref = run_both(llama2, 1, [])
    bh.assert_matches(out, ref, "a single decode token")
    new = llama2.compiled.backend.num_calls - calls
    assert len(compile_reports(since=mark)) == new  # every backend call publishes a report ...
    if new:  # ... and a recompile says so in it
        assert compile_reports()[-1].recompiles == llama2.compiled.recompiles >= 1


def test_single_token_step_does_not_recompile(llama2: bh.Compiled) -> None:
    # the token dim is marked unbacked, so Dynamo does not specialise it on 0/1
    calls = llama2.compiled.backend.num_calls
    out, ref = run_both(llama2, 1, [])
    bh.assert_matches(out, ref, "a single decode token")
    assert llama2.compiled.backend.num_calls == calls
    assert llama2.compiled.recompiles == 0


@pytest.mark.slow
def test_compile_sizes_static_variant_at_n_and_dynamic_elsewhere() -> None:
    n = 4
    c = bh.compile_zoo("llama", 2, compile_sizes=(n,))
    bh.assert_matches(c.out, c.ref, "compile_sizes model at 12 tokens")
    static_calls: list[str] = []
    real = c.compiled.backend._compile_piece

    def spy(name, gm, args, context, static=False):  # the static variants compile through here
        if static:
            static_calls.append(name)
        return real(name, gm, args, context, static=static)

    c.compiled.backend._compile_piece = spy
    calls = c.compiled.backend.num_calls
    plan = [((1, [5]), False), ((2, [2]), True), ((0, [3, 1]), True), ((3, [3]), False)]  # 6, n, n, 6 tokens
    for (decodes, prefills), at_n in plan:
        before = len(static_calls)
        out, ref = run_both(c, decodes, prefills)
        bh.assert_matches(out, ref, f"compile_sizes={(n,)} model at {decodes} decodes + prefills {prefills}")
        if not at_n:
            assert len(static_calls) == before, "no static variant may compile for a size not in compile_sizes"
        elif before:
            assert len(static_calls) == before, "a static variant must compile once, then be reused"
    assert static_calls and all(s.endswith("-static") for s in static_calls)
    assert len(static_calls) <= c.report.num_pieces
    assert c.compiled.backend.num_calls == calls, "compile_sizes must not cause Dynamo recompiles"


class ConvBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)) + x


class ConvNet(torch.nn.Module):
    """A small image model: a stem conv, optionally a ``ModuleList`` of repeated conv blocks, a head."""

    def __init__(self, repeated: bool) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.layers = torch.nn.ModuleList(ConvBlock() for _ in range(2)) if repeated else None
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for layer in self.layers or ():
            x = layer(x)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("repeated", [True, False], ids=["regions", "whole-model"])
def test_image_batch_is_not_a_token_count(repeated: bool) -> None:
    """Issue 29: ``dynamic_tokens`` marked dim 0 of every input unbacked, so a conv net's image
    batch crashed Inductor's ``assert_size_stride``; only token layouts are marked now."""
    import layerpass
    from layerpass.backend.config import CompilationConfig

    torch.manual_seed(0)
    model = ConvNet(repeated).eval()
    compiled = layerpass.compile(model, CompilationConfig(cache_dir=bh.fresh_cache_dir("conv")))
    with torch.no_grad():
        for batch in (2, 3):
            x = torch.randn(batch, 3, 12, 12)
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    assert layerpass.last_compile_report().trace == ("regions" if repeated else "whole-model")


def test_token_dims_rule() -> None:
    from layerpass.backend.token_dims import token_dims

    assert token_dims(torch.zeros(6), None) == [0] and token_dims(torch.zeros(6, 8), None) == [0]
    assert token_dims(torch.zeros(1, 5, 8), 5) == [1]  # HF's [1, T, H]
    assert token_dims(torch.zeros(2, 8, 4, 4), None) == [] and token_dims(torch.zeros(1, 1, 5, 16), 5) == []
    assert token_dims(torch.zeros(()), None) == []
