"""Transformers backend numerics: a converted HF model equals the HF model's own eager run, for
every tested family (``common.FAMILIES``: tiny random configs, 2 layers, nothing downloaded).

The reference is the untouched Hugging Face model (``attn_implementation="eager"``), run on each
request's FULL token sequence (history + this step's tokens) with HF's own causal / sliding
mask, rotary, soft-caps, multipliers and experts; the converted model runs decode-first
``make_step`` batches on layerpass layers and the paged KV cache. float32, tolerance 1e-4.
Weights are redrawn to O(1) logits (``randomize_weights``) so a wrong head, weight or position
shows far above the tolerance. The zoo configs set an 8-token sliding window, so the sequences
here (up to 29 tokens) cross it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")

from layerpass.models import make_step  # noqa: E402
from layerpass.models.hf import build_hf_model, from_transformers  # noqa: E402
from layerpass.ops import build_batch_metadata, set_forward_context  # noqa: E402
from tests.models.hf.common import FAMILIES, close, hf_config, hf_logits, pair  # noqa: E402


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_architecture_is_what_the_zoo_name_says(name: str) -> None:
    hf, model = pair(name)
    assert type(hf).__name__ == FAMILIES[name] and model.architecture == FAMILIES[name]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_prefill_equals_hf_eager(name: str) -> None:
    hf, model = pair(name)
    step = make_step(model, num_decodes=0, prefill_lens=[11], seed=3)
    try:
        close(step.run(), hf_logits(hf, step.requests[0].tokens), f"{name} prefill")
    finally:
        step.release()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_decode_steps_equal_hf_full_sequence(name: str) -> None:
    """A prompt, then decode steps one token at a time against the KV cache the previous steps
    wrote, past the sliding window: each step's logits equal HF's on the whole sequence."""
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
        for _ in range(6):
            tokens.append(int(logits[-1].argmax()))
            pos = len(tokens) - 1
            md = build_batch_metadata([1], [pos], [blocks], bs)
            with torch.no_grad(), set_forward_context(md, model.layer_registry):
                logits = model(torch.tensor(tokens[-1:]), torch.tensor([pos]))
            close(logits[0], hf_logits(hf, tokens)[-1], f"{name} decode at position {pos}")
    finally:
        model.block_allocator.free(blocks)


@settings(max_examples=24, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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


def _variant(hf, what: str, seed: int = 0):
    model = from_transformers(copy.deepcopy(hf))
    step = make_step(model, num_decodes=2, prefill_lens=[5, 1], seed=seed, max_history=20)
    try:
        for req, rows in zip(step.requests, step.split(step.run())):
            close(rows, hf_logits(hf, list(req.history) + list(req.tokens))[len(req.history):], what)
    finally:
        step.release()
    return model


def test_qwen2_with_sliding_window_layers() -> None:
    """Qwen2's ``use_sliding_window``: layers from ``max_window_layers`` on slide, the first does not."""
    from transformers import Qwen2Config

    cfg = Qwen2Config(**{**hf_config("hf-qwen2").to_dict(), "use_sliding_window": True, "sliding_window": 4,
                         "max_window_layers": 1, "layer_types": None})
    model = _variant(build_hf_model(cfg, seed=2), "qwen2 sliding window")
    assert [layer.self_attn.attn.sliding_window for layer in model.model.layers] == [None, 4]


def test_gpt2_converts_with_no_per_family_code() -> None:
    """GPT-2 (Conv1D projections, LayerNorm, learned positions) has nothing the converter packs:
    its modules run as they are, only its attention and embeddings move to layerpass."""
    from transformers import GPT2Config

    from layerpass.layers import Attention, ParallelLMHead, VocabParallelEmbedding

    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=128, bos_token_id=0, eos_token_id=0)
    model = _variant(build_hf_model(cfg, seed=1), "gpt2")
    assert isinstance(model.model.wte, VocabParallelEmbedding) and isinstance(model.lm_head, ParallelLMHead)
    assert all(isinstance(block.attn.attn, Attention) for block in model.model.h)


def test_gpt_oss_sinks_and_an_moe_block_without_handler() -> None:
    """GPT-OSS: learned attention sinks and alternating sliding windows go to the layerpass
    ``Attention``; its MoE block (no per-family handler) runs as the HF module it is."""
    from transformers import GptOssConfig

    cfg = GptOssConfig(vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                       layer_types=["sliding_attention", "full_attention"], pad_token_id=0, eos_token_id=None,
                       bos_token_id=None)
    ref = build_hf_model(cfg, seed=0)
    model = _variant(ref, "gpt-oss")
    attns = [layer.self_attn.attn for layer in model.model.layers]
    assert [a.sliding_window for a in attns] == [8, None]
    for layer, a in zip(ref.model.layers, attns):
        torch.testing.assert_close(a.sinks, layer.self_attn.sinks.detach(), rtol=0, atol=0)
    assert type(model.model.layers[0].mlp).__name__ == "GptOssMLP"


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kv_heads=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([8, 16]), bias=st.booleans(),
       tie=st.booleans(), act=st.sampled_from(["silu", "gelu"]), seed=st.integers(0, 2**16))
def test_llama_config_variants(kv_heads, head_dim, bias, tie, act, seed) -> None:
    """GQA widths, biases, tied embeddings and a non-SiLU MLP (HF's forward on a packed
    gate/up) all keep HF's numbers."""
    from transformers import LlamaConfig

    from layerpass.models.hf import TransformersMLP, TransformersPackedMLP

    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, head_dim=head_dim, attention_bias=bias, mlp_bias=bias,
                      tie_word_embeddings=tie, hidden_act=act, max_position_embeddings=256)
    model = _variant(build_hf_model(cfg, seed=seed), "llama variant", seed)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    assert type(model.model.layers[0].mlp) is (TransformersMLP if act == "silu" else TransformersPackedMLP)
