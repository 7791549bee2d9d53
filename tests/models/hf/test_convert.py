"""Transformers backend structure: what the converter swaps, how layers are named, what it
refuses (naming it and what is supported), OOT replacement and LoRA of the MoE layer, and that
the core imports without transformers."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from layerpass.layers import (  # noqa: E402
    Attention,
    Fp8Config,
    FusedMoEWithLoRA,
    LoRAConfig,
    MergedColumnParallelLinear,
    ParallelLMHead,
    PluggableLayer,
    QKVParallelLinear,
    ReplicatedLinear,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
    apply_lora,
)
from layerpass.models import ModelConfig, build_model, make_step, registered_models  # noqa: E402
from layerpass.ops import FP8_DTYPE  # noqa: E402
from layerpass.models.hf import (  # noqa: E402
    HF_ZOO,
    TransformersAttention,
    TransformersFusedMoE,
    TransformersMLP,
    TransformersSparseMoeBlock,
    UnsupportedArchitectureError,
    UnsupportedModuleError,
    build_hf_model,
    from_transformers,
    layerpass_attention_forward,
    supported_architectures,
)


def hf(name: str, num_layers: int = 2, **overrides):
    return build_hf_model(HF_ZOO[name](ModelConfig(num_layers=num_layers, **overrides)), seed=0)


def test_zoo_names_are_registered() -> None:
    assert {"hf-llama", "hf-qwen2-moe", "hf-mixtral", "hf-qwen3-moe"} <= set(registered_models())
    assert {"LlamaForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM", "Qwen3MoeForCausalLM"} <= set(supported_architectures())


@pytest.mark.parametrize("name", ["hf-llama", "hf-qwen2-moe", "hf-qwen3-moe", "hf-mixtral"])
def test_layers_are_swapped_and_registered_by_hf_path(name: str) -> None:
    model = build_model(name, num_layers=3, seed=1)
    reg = model.layer_registry
    assert isinstance(model.model.embed_tokens, VocabParallelEmbedding) and reg.get("model.embed_tokens") is model.model.embed_tokens
    assert isinstance(model.lm_head, ParallelLMHead) and reg.get("lm_head") is model.lm_head
    assert isinstance(model.model.norm, RMSNorm)
    assert isinstance(model.model.layers, nn.ModuleList) and len(model.model.layers) == 3
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        assert isinstance(attn, TransformersAttention) and isinstance(attn.qkv_proj, QKVParallelLinear)
        assert isinstance(attn.o_proj, RowParallelLinear)
        assert reg.get(f"model.layers.{i}.self_attn.attn") is attn.attn and isinstance(attn.attn, Attention)
        assert attn.attn.kv_cache.shape[1:3] == (model.cache_config.num_blocks, model.cache_config.block_size)
        assert isinstance(layer.input_layernorm, RMSNorm) and isinstance(layer.post_attention_layernorm, RMSNorm)
        if name == "hf-llama":
            assert isinstance(layer.mlp, TransformersMLP) and isinstance(layer.mlp.gate_up_proj, MergedColumnParallelLinear)
        else:
            assert isinstance(layer.mlp, TransformersSparseMoeBlock) and isinstance(layer.mlp.gate, ReplicatedLinear)
            assert type(layer.mlp.experts) is TransformersFusedMoE
            assert reg.get(f"model.layers.{i}.mlp.experts") is layer.mlp.experts
            assert (layer.mlp.experts.shared_experts is not None) == (name == "hf-qwen2-moe")
        if name == "hf-qwen3-moe":
            assert isinstance(attn.q_norm, RMSNorm) and reg.get(f"model.layers.{i}.self_attn.q_norm") is attn.q_norm
    # nothing HF-trainable is left behind: every parameter belongs to a layerpass layer
    for pname, _ in model.named_parameters():
        owner = model.get_submodule(pname.rpartition(".")[0])
        assert isinstance(owner, PluggableLayer), f"{pname} is held by a {type(owner).__name__}, not a layerpass layer"


def test_weights_are_kept_exactly() -> None:
    ref = hf("hf-qwen2-moe")
    model = from_transformers(copy.deepcopy(ref))
    r, m = ref.model.layers[1], model.model.layers[1]
    hf_attn = r.self_attn
    torch.testing.assert_close(m.self_attn.qkv_proj.weight, torch.cat([hf_attn.q_proj.weight, hf_attn.k_proj.weight, hf_attn.v_proj.weight]), rtol=0, atol=0)
    torch.testing.assert_close(m.mlp.experts.w13_weight, r.mlp.experts.gate_up_proj, rtol=0, atol=0)
    torch.testing.assert_close(m.mlp.experts.w2_weight, r.mlp.experts.down_proj, rtol=0, atol=0)
    torch.testing.assert_close(m.mlp.gate.weight, r.mlp.gate.weight, rtol=0, atol=0)
    emb = model.model.embed_tokens.weight
    torch.testing.assert_close(emb[: ref.config.vocab_size], ref.model.embed_tokens.weight, rtol=0, atol=0)
    assert not emb[ref.config.vocab_size:].any(), "vocabulary padding rows must be zero"


def test_fp8_quantises_the_hf_weights() -> None:
    """With an ``Fp8Config`` the linears hold the HF weights quantised (per-tensor scale from the
    full weight's absmax), and the model still tracks the float one."""
    ref = hf("hf-llama")
    model = from_transformers(copy.deepcopy(ref), quant_config=Fp8Config())
    lin = model.model.layers[0].self_attn.qkv_proj
    a = ref.model.layers[0].self_attn
    full = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach()
    assert lin.weight.dtype == FP8_DTYPE
    torch.testing.assert_close(lin.weight_scale, full.abs().max().reshape(1) / 448.0)
    err = (lin.weight.float() * lin.weight_scale - full).abs()
    assert (err <= 2**-4 * full.abs() + lin.weight_scale * 2**-9).all(), "dequantised weight is not the HF weight"
    floats = from_transformers(copy.deepcopy(ref))
    sq, sf = make_step(model, num_decodes=1, prefill_lens=[4], seed=0), make_step(floats, num_decodes=1, prefill_lens=[4], seed=0)
    x, y = sq.run(), sf.run()
    assert 0 < (x - y).abs().max() and torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1] > 0.99


def test_attention_function_is_registered_with_transformers() -> None:
    from transformers import AttentionInterface

    model = from_transformers(hf("hf-llama"))
    assert AttentionInterface._global_mapping["layerpass"] is layerpass_attention_forward
    assert model.hf_config._attn_implementation == "layerpass"


def test_attention_function_needs_a_converted_module() -> None:
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(TypeError, match="layerpass Attention at `module.attn`.*from_transformers"):
        layerpass_attention_forward(nn.Linear(2, 2), q, q, q, None)


def test_unsupported_architecture_names_it_and_lists_supported() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=32))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM, MixtralForCausalLM"):
        from_transformers(gpt2)


def test_unsupported_module_names_its_path_and_lists_supported() -> None:
    model = hf("hf-llama")
    model.model.layers[1].mlp = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(UnsupportedModuleError, match=r"'model\.layers\.1\.mlp' \(.*Sequential\).*supported modules: .*LlamaMLP"):
        from_transformers(model)


def test_subclassed_module_is_not_assumed_to_compute_the_same() -> None:
    model = hf("hf-llama")
    base = type(model.model.layers[0].self_attn)
    model.model.layers[0].self_attn.__class__ = type("PatchedAttention", (base,), {})
    with pytest.raises(UnsupportedModuleError, match="PatchedAttention"):
        from_transformers(model)


def test_sliding_window_is_refused() -> None:
    from transformers import MixtralConfig

    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=8)
    with pytest.raises(UnsupportedModuleError, match="sliding-window"):
        from_transformers(build_hf_model(cfg))


def test_shared_op_calls_moe_forward_shared_with_same_numbers() -> None:
    model = build_model("hf-qwen2-moe", num_layers=2)
    step = make_step(model, num_decodes=1, prefill_lens=[4], seed=2)
    ref = step.run()
    for layer in model.model.layers:
        layer.mlp.experts.shared_op = True
    torch.testing.assert_close(step.run(), ref, atol=1e-5, rtol=1e-5)


def test_oot_moe_replaces_it_and_lora_accepts_it(clean_oot) -> None:
    base_model = build_model("hf-qwen2-moe", num_layers=2, seed=4)
    step = make_step(base_model, num_decodes=1, prefill_lens=[3], seed=1)
    ref = step.run()

    @TransformersFusedMoE.register_oot
    class CountingMoE(TransformersFusedMoE):
        calls = 0

        def forward(self, hidden_states, router_logits):
            CountingMoE.calls += 1
            return super().forward(hidden_states, router_logits)

    model = build_model("hf-qwen2-moe", num_layers=2, seed=4)
    experts = [layer.mlp.experts for layer in model.model.layers]
    assert all(type(e) is CountingMoE for e in experts)
    step2 = make_step(model, num_decodes=1, prefill_lens=[3], seed=1)
    torch.testing.assert_close(step2.run(), ref, atol=1e-5, rtol=1e-5)
    assert CountingMoE.calls == 2 * 2  # two layers, history prefill + the step

    assert FusedMoEWithLoRA.can_replace_layer(experts[0], LoRAConfig(), ["gate_proj", "up_proj"])
    wrapped = apply_lora(model, LoRAConfig(max_lora_rank=4, target_modules=("experts",)))
    moe_wrappers = {n: w for n, w in wrapped.items() if n.endswith("mlp.experts")}
    assert len(moe_wrappers) == 2 and all(type(w) is FusedMoEWithLoRA for w in moe_wrappers.values())
    assert all(type(w.base_layer) is CountingMoE for w in moe_wrappers.values())
    torch.testing.assert_close(step2.run(), ref, atol=1e-4, rtol=1e-4)  # zero adapters: the base output
    w = next(iter(moe_wrappers.values()))
    w.set_lora(w.random_lora(seed=0, std=0.5))
    assert (step2.run() - ref).abs().max() > 1e-3, "a non-zero MoE adapter must change the logits"


def test_core_imports_without_transformers() -> None:
    code = textwrap.dedent("""
        import sys
        sys.modules["transformers"] = None  # import transformers -> ImportError
        import layerpass.models as m
        from layerpass.models import hf
        assert not any(n.startswith("hf-") for n in m.registered_models()), m.registered_models()
        try:
            hf.from_config(object())
        except ImportError as e:
            print("ERR", e)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ERR the Hugging Face backend needs transformers: pip install 'layerpass[transformers]'" in proc.stdout
