"""Greedy generation of a converted HF model equals ``hf_model.generate(do_sample=False)`` token for
token, served by a small continuous-batching loop (``common.generate_cb``): three requests
joining at steps 0, 1 and 3, every step one decode-first batch mixing the running requests'
decodes with the newly admitted prompts, each request on its own KV blocks. Eager, every family.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from tests.models.hf.common import (  # noqa: E402
    FAMILIES,
    GEN_ADMIT_AT,
    GEN_NEW_TOKENS,
    GEN_PROMPT_LENS,
    LoopStats,
    generate_cb,
    hf_generate,
    pair,
    prompts,
)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_continuous_batching_greedy_equals_hf_generate(name: str) -> None:
    hf, model = pair(name)
    ps = prompts(model.config.vocab_size, GEN_PROMPT_LENS, seed=1)
    stats = LoopStats()
    free_before = model.block_allocator.num_free
    got = generate_cb(model, ps, GEN_ADMIT_AT, GEN_NEW_TOKENS, stats=stats)
    assert stats.mixed_steps >= 2 and stats.max_batch == 3, f"the loop did not mix decodes and prefills: {stats}"
    assert model.block_allocator.num_free == free_before, "KV blocks leaked"
    for i, p in enumerate(ps):
        assert got[i] == hf_generate(hf, p, GEN_NEW_TOKENS), f"{name} request {i} (prompt {len(p)} tokens)"


def test_long_generation_crosses_the_sliding_window() -> None:
    """Gemma 2 past several sliding windows (8 tokens) and a KV block boundary (16)."""
    hf, model = pair("hf-gemma2")
    ps = prompts(model.config.vocab_size, (3, 12), seed=4)
    got = generate_cb(model, ps, (0, 2), 20)
    assert got == [hf_generate(hf, p, 20) for p in ps]
