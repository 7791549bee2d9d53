"""Converted HF models under ``layerpass.compile`` (regions, the default path): every family's
decoder layers trace as regions (never the whole model), and greedy continuous batching through
the compiled model gives HF ``generate()``'s tokens, across decode-only and mixed steps, without
a new region trace after the first steps.

One compile per family (about 10-25 s each on the shared 2-core box): slow.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import layerpass  # noqa: E402
from layerpass.backend.config import CompilationConfig  # noqa: E402
from tests.helpers import backend as bh  # noqa: E402
from tests.models.hf import common as hc  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(hc.FAMILIES))
def test_regions_greedy_equals_hf_generate(name: str) -> None:
    hf, model = hc.pair(name, 2)
    compiled = layerpass.compile(model, CompilationConfig(cache_dir=bh.fresh_cache_dir(f"regions-gen-{name}")))
    ps = hc.prompts(model.config.vocab_size, hc.GEN_PROMPT_LENS, seed=7)
    stats = hc.LoopStats()
    reports: list = []

    def run(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = compiled(input_ids, positions)
        reports.append(layerpass.last_compile_report())
        return out

    got = hc.generate_cb(model, ps, hc.GEN_ADMIT_AT, hc.GEN_NEW_TOKENS, fn=run, stats=stats)
    assert stats.mixed_steps >= 2 and stats.steps > len(hc.GEN_PROMPT_LENS)
    assert {r.trace for r in reports} == {"regions"}, [(r.trace, r.notes) for r in reports]
    # regions are traced in the first steps (a one-token step may specialise a region of its own);
    # the rest of the loop only calls them
    assert compiled.recompiles <= 1, compiled.recompiles
    assert got == [hc.hf_generate(hf, p, hc.GEN_NEW_TOKENS) for p in ps], f"{name}: layerpass.compile greedy tokens differ from HF"
