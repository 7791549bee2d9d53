"""Greedy generation of a converted HF model equals ``hf_model.generate(do_sample=False)`` token for
token, served by a small continuous-batching loop (``common.generate_cb``): three requests
joining at steps 0, 1 and 3, every step one decode-first batch mixing the running requests'
decodes with the newly admitted prompts, each request on its own KV blocks. Eager, every family.
"""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("transformers")

from layerpass.models.hf import build_hf_model, from_transformers  # noqa: E402
from tests.models.hf import common as hc  # noqa: E402


@pytest.mark.parametrize("name", sorted(hc.FAMILIES))
def test_continuous_batching_greedy_equals_hf_generate(name: str) -> None:
    hf, model = hc.pair(name)
    ps = hc.prompts(model.config.vocab_size, hc.GEN_PROMPT_LENS, seed=1)
    stats = hc.LoopStats()
    free_before = model.block_allocator.num_free
    got = hc.generate_cb(model, ps, hc.GEN_ADMIT_AT, hc.GEN_NEW_TOKENS, stats=stats)
    assert stats.mixed_steps >= 2 and stats.max_batch == 3, f"the loop did not mix decodes and prefills: {stats}"
    assert model.block_allocator.num_free == free_before, "KV blocks leaked"
    for i, p in enumerate(ps):
        assert got[i] == hc.hf_generate(hf, p, hc.GEN_NEW_TOKENS), f"{name} request {i} (prompt {len(p)} tokens)"


def test_long_generation_crosses_the_sliding_window() -> None:
    """Gemma 2 past several sliding windows (8 tokens) and a KV block boundary (16)."""
    hf, model = hc.pair("hf-gemma2")
    ps = hc.prompts(model.config.vocab_size, (3, 12), seed=4)
    got = hc.generate_cb(model, ps, (0, 2), 20)
    assert got == [hc.hf_generate(hf, p, 20) for p in ps]


@pytest.mark.parametrize("name", ["hf-llama", "hf-qwen3"])
def test_heads_times_head_dim_other_than_hidden_size(name: str) -> None:
    """4 heads x head_dim 32 = 128 attention features on a 64-wide model: q/k/v widen, o_proj narrows."""
    hf = build_hf_model(hc.hf_config(name, head_size=32))
    model = from_transformers(copy.deepcopy(hf))
    assert model.config.num_heads * model.config.head_size != model.config.hidden_size
    ps = hc.prompts(model.config.vocab_size, hc.GEN_PROMPT_LENS, seed=1)
    got = hc.generate_cb(model, ps, hc.GEN_ADMIT_AT, hc.GEN_NEW_TOKENS)
    assert got == [hc.hf_generate(hf, p, hc.GEN_NEW_TOKENS) for p in ps]
