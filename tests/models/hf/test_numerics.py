"""Transformers backend numerics: a converted HF model equals the HF model's own eager run.

The reference is the untouched Hugging Face model (``attn_implementation="eager"``), run on each
request's FULL token sequence (history + this step's tokens) with HF's own causal mask, rotary
and experts; the converted model runs decode-first ``make_step`` batches on layerpass layers and
the paged KV cache. float32, tolerance 1e-4. Weights are redrawn to O(1) logits
(``randomize_weights``) so a wrong head, weight or position shows far above the tolerance.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")

from layerpass.models import ModelConfig, make_step  # noqa: E402
from layerpass.models.hf import HF_ZOO, build_hf_model, from_transformers  # noqa: E402
from layerpass.ops import build_batch_metadata, set_forward_context  # noqa: E402

ATOL = RTOL = 1e-4
FAMILIES = {"hf-llama": "LlamaForCausalLM", "hf-qwen2-moe": "Qwen2MoeForCausalLM", "hf-mixtral": "MixtralForCausalLM",
            "hf-qwen3-moe": "Qwen3MoeForCausalLM"}


@functools.cache
def pair(name: str, num_layers: int = 2, seed: int = 0):
    """(HF reference model, converted model) with identical weights; the converted one consumes a copy."""
    hf = build_hf_model(HF_ZOO[name](ModelConfig(num_layers=num_layers)), seed=seed)
    return hf, from_transformers(copy.deepcopy(hf))


def hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=torch.tensor([tokens]), use_cache=False).logits[0]


def close(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ref.abs().mean() > 0.1, "reference logits near zero: the comparison would be meaningless"
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def test_architectures_are_what_the_zoo_names_say() -> None:
    for name, arch in FAMILIES.items():
        hf, model = pair(name)
        assert type(hf).__name__ == arch and model.architecture == arch


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_prefill_equals_hf_eager(name: str) -> None:
    hf, model = pair(name)
    step = make_step(model, num_decodes=0, prefill_lens=[11], seed=3)
    try:
        close(step.run(), hf_logits(hf, list(step.requests[0].tokens)), f"{name} prefill")
    finally:
        step.release()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(FAMILIES)), num_decodes=st.integers(0, 3),
       prefill_lens=st.lists(st.integers(1, 9), max_size=2), seed=st.integers(0, 2**16))
def test_mixed_decode_first_batch_equals_hf_on_full_sequences(name, num_decodes, prefill_lens, seed) -> None:
    if num_decodes + len(prefill_lens) == 0:
        prefill_lens = [4]
    hf, model = pair(name)
    step = make_step(model, num_decodes=num_decodes, prefill_lens=prefill_lens, seed=seed, max_history=20)
    try:
        out = step.run()
        assert out.shape == (len(step.input_ids), model.config.vocab_size)
        for i, (req, rows) in enumerate(zip(step.requests, step.split(out))):
            ref = hf_logits(hf, list(req.history) + list(req.tokens))[len(req.history):]
            close(rows, ref, f"{name} request {i} ({'decode' if req.is_decode else 'prefill'})")
    finally:
        step.release()


@pytest.mark.parametrize("name", ["hf-llama", "hf-qwen2-moe"])
def test_greedy_decode_steps_equal_hf_full_sequence(name: str) -> None:
    """Prefill, then four decode steps, each one token against the KV cache the previous wrote."""
    hf, model = pair(name)
    bs = model.cache_config.block_size
    prompt = torch.randint(0, model.config.vocab_size, (6,), generator=torch.Generator().manual_seed(7)).tolist()
    blocks = model.block_allocator.allocate(2)
    try:
        tokens = list(prompt)
        md = build_batch_metadata([len(tokens)], [0], [blocks], bs)
        with torch.no_grad(), set_forward_context(md, model.layer_registry):
            logits = model(torch.tensor(tokens), torch.arange(len(tokens)))
        close(logits, hf_logits(hf, tokens), f"{name} prompt")
        for _ in range(4):
            tokens.append(int(logits[-1].argmax()))
            pos = len(tokens) - 1
            md = build_batch_metadata([1], [pos], [blocks], bs)
            with torch.no_grad(), set_forward_context(md, model.layer_registry):
                logits = model(torch.tensor(tokens[-1:]), torch.tensor([pos]))
            close(logits[0], hf_logits(hf, tokens)[-1], f"{name} decode at position {pos}")
    finally:
        model.block_allocator.free(blocks)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kv_heads=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([8, 16]), bias=st.booleans(),
       tie=st.booleans(), act=st.sampled_from(["silu", "gelu"]), seed=st.integers(0, 2**16))
def test_llama_config_variants(kv_heads, head_dim, bias, tie, act, seed) -> None:
    """GQA widths, biases, tied embeddings and a non-SiLU MLP (kept as HF's forward on
    column/row-parallel linears) all keep HF's numbers."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, head_dim=head_dim, attention_bias=bias, mlp_bias=bias,
                      tie_word_embeddings=tie, hidden_act=act, max_position_embeddings=256)
    hf = build_hf_model(cfg, seed=seed)
    model = from_transformers(copy.deepcopy(hf))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    step = make_step(model, num_decodes=1, prefill_lens=[5], seed=seed, max_history=10)
    for req, rows in zip(step.requests, step.split(step.run())):
        close(rows, hf_logits(hf, list(req.history) + list(req.tokens))[len(req.history):], "llama variant")
