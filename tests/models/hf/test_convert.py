"""Transformers backend structure: what the generic converter swaps in each family, how layers are
named, the attention features it reads, what the probes keep as HF modules, the clear error for
each kind of model it cannot run, OOT replacement and LoRA, and that the core imports without
transformers."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from layerpass import layers as lp  # noqa: E402
from layerpass.layers.layernorm import GemmaRMSNorm  # noqa: E402
from layerpass.models import ModelConfig, build_model, make_step, registered_models  # noqa: E402
from layerpass.models import hf as lphf  # noqa: E402
from layerpass.ops import FP8_DTYPE  # noqa: E402
from tests.models.hf.common import FAMILIES, hf_config, hf_logits, matches_hf  # noqa: E402

MOE = {"hf-qwen2-moe", "hf-mixtral", "hf-qwen3-moe"}
GEMMA = {"hf-gemma2", "hf-gemma3"}


def hf(name: str, num_layers: int = 2, **overrides):
    return lphf.build_hf_model(lphf.HF_ZOO[name](ModelConfig(num_layers=num_layers, **overrides)), seed=0)


def test_zoo_names_are_registered() -> None:
    assert set(lphf.HF_ZOO) == set(lphf.TESTED_ARCHITECTURES.values()) <= set(registered_models())
    assert lphf.supported_architectures() == sorted(lphf.TESTED_ARCHITECTURES)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_layers_are_swapped_and_registered_by_hf_path(name: str) -> None:
    model = build_model(name, num_layers=3, seed=1)
    reg = model.layer_registry
    emb = model.model.embed_tokens
    if name in GEMMA:  # Gemma's embedding scales by sqrt(hidden): the scale stays, the table is vocab-parallel
        assert isinstance(emb, lphf.TransformersScaledEmbedding) and float(emb.embed_scale) == pytest.approx(64 ** 0.5)
        emb = emb.embedding
    assert isinstance(emb, lp.VocabParallelEmbedding) and reg.get("model.embed_tokens") is emb
    assert isinstance(model.lm_head, lp.ParallelLMHead) and reg.get("lm_head") is model.lm_head
    assert (model.lm_head.weight is emb.weight) == (name in GEMMA)  # tied in Gemma's configs
    norm_cls = GemmaRMSNorm if name in GEMMA else lp.RMSNorm
    assert type(model.model.norm) is norm_cls
    assert isinstance(model.model.layers, nn.ModuleList) and len(model.model.layers) == 3
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        attn = layer.self_attn
        if name == "hf-phi3":  # packed in the checkpoint: loaded as is, HF module kept
            assert type(attn).__name__ == "Phi3Attention" and isinstance(attn.qkv_proj, lp.QKVParallelLinear)
        else:
            assert isinstance(attn, lphf.TransformersAttention) and isinstance(attn.qkv_proj, lp.QKVParallelLinear)
            assert all(isinstance(getattr(attn.hf_attn, n), lphf.PackedSlice) for n in ("q_proj", "k_proj", "v_proj"))
        assert reg.get(f"{p}.self_attn.qkv_proj") is attn.qkv_proj
        assert isinstance(attn.o_proj, lp.RowParallelLinear) and reg.get(f"{p}.self_attn.o_proj") is attn.o_proj
        assert isinstance(attn.attn, lp.Attention) and reg.get(f"{p}.self_attn.attn") is attn.attn
        assert attn.attn.kv_cache.shape[1:3] == (model.cache_config.num_blocks, model.cache_config.block_size)
        norms = [m for n, m in layer.named_children() if "norm" in n]
        assert norms and all(type(m) is norm_cls for m in norms)
        if name in MOE:
            assert isinstance(layer.mlp, lphf.TransformersSparseMoeBlock) and isinstance(layer.mlp.gate, lp.ReplicatedLinear)
            assert type(layer.mlp.experts) is lphf.TransformersFusedMoE and reg.get(f"{p}.mlp.experts") is layer.mlp.experts
            assert (layer.mlp.experts.shared_experts is not None) == (name == "hf-qwen2-moe")
        elif name in GEMMA:  # GELU: HF's forward on one packed gate/up projection
            assert isinstance(layer.mlp, lphf.TransformersPackedMLP)
            assert isinstance(layer.mlp.gate_up_proj, lp.MergedColumnParallelLinear)
        else:  # SiLU-gated (Phi-3's packed gate_up_proj too): the silu_and_mul layer
            assert isinstance(layer.mlp, lphf.TransformersMLP)
            assert isinstance(layer.mlp.gate_up_proj, lp.MergedColumnParallelLinear)
            assert reg.get(f"{p}.mlp.gate_up_proj") is layer.mlp.gate_up_proj
        if name in ("hf-qwen3", "hf-qwen3-moe", "hf-olmo2", "hf-gemma3"):
            assert type(attn.q_norm) is norm_cls and reg.get(f"{p}.self_attn.q_norm") is attn.q_norm
    # nothing HF-trainable is left behind: every parameter belongs to a layerpass layer
    for pname, _ in model.named_parameters():
        owner = model.get_submodule(pname.rpartition(".")[0])
        assert isinstance(owner, lp.PluggableLayer), f"{pname} is held by a {type(owner).__name__}, not a layerpass layer"


def attention_features(model) -> list[tuple]:
    return [(a.scale, a.sliding_window, a.logits_soft_cap) for a in (layer.self_attn.attn for layer in model.model.layers)]


def test_attention_features_are_read_per_layer() -> None:
    """Sliding windows (alternating in Gemma), soft-caps and the scale each module passes."""
    gemma_scale = (16 + 8) ** -0.5  # query_pre_attn_scalar
    assert attention_features(build_model("hf-gemma2", num_layers=4)) == [(gemma_scale, 8, 5.0), (gemma_scale, None, 5.0)] * 2
    assert attention_features(build_model("hf-gemma3", num_layers=4)) == [(gemma_scale, 8, None), (gemma_scale, None, None)] * 2
    assert attention_features(build_model("hf-mistral", num_layers=2)) == [(0.25, 8, None)] * 2
    assert attention_features(build_model("hf-granite", num_layers=2)) == [(0.2, None, None)] * 2  # attention_multiplier
    assert attention_features(build_model("hf-llama", num_layers=2)) == [(0.25, None, None)] * 2


def test_weights_are_kept_exactly() -> None:
    ref = hf("hf-qwen2-moe")
    model = lphf.from_transformers(copy.deepcopy(ref))
    r, m = ref.model.layers[1], model.model.layers[1]
    hf_attn = r.self_attn
    torch.testing.assert_close(m.self_attn.qkv_proj.weight, torch.cat([hf_attn.q_proj.weight, hf_attn.k_proj.weight, hf_attn.v_proj.weight]), rtol=0, atol=0)
    torch.testing.assert_close(m.mlp.experts.w13_weight, r.mlp.experts.gate_up_proj, rtol=0, atol=0)
    torch.testing.assert_close(m.mlp.experts.w2_weight, r.mlp.experts.down_proj, rtol=0, atol=0)
    torch.testing.assert_close(m.mlp.gate.weight, r.mlp.gate.weight, rtol=0, atol=0)
    emb = model.model.embed_tokens.weight
    torch.testing.assert_close(emb[: ref.config.vocab_size], ref.model.embed_tokens.weight, rtol=0, atol=0)
    assert not emb[ref.config.vocab_size:].any(), "vocabulary padding rows must be zero"
    g = hf("hf-gemma2")
    gm = lphf.from_transformers(copy.deepcopy(g))  # Gemma's 1 + w, held in float32
    torch.testing.assert_close(gm.model.layers[0].input_layernorm.weight, 1 + g.model.layers[0].input_layernorm.weight.float(),
                               rtol=0, atol=0)


def test_fp8_quantises_the_hf_weights() -> None:
    """With an ``Fp8Config`` the linears hold the HF weights quantised (per-tensor scale from the
    full weight's absmax), and the model still tracks the float one."""
    ref = hf("hf-llama")
    model = lphf.from_transformers(copy.deepcopy(ref), quant_config=lp.Fp8Config())
    lin = model.model.layers[0].self_attn.qkv_proj
    a = ref.model.layers[0].self_attn
    full = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach()
    assert lin.weight.dtype == FP8_DTYPE
    torch.testing.assert_close(lin.weight_scale, full.abs().max().reshape(1) / 448.0)
    err = (lin.weight.float() * lin.weight_scale - full).abs()
    assert (err <= 2**-4 * full.abs() + lin.weight_scale * 2**-9).all(), "dequantised weight is not the HF weight"
    floats = lphf.from_transformers(copy.deepcopy(ref))
    sq, sf = make_step(model, num_decodes=1, prefill_lens=[4], seed=0), make_step(floats, num_decodes=1, prefill_lens=[4], seed=0)
    x, y = sq.run(), sf.run()
    assert 0 < (x - y).abs().max() and torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1] > 0.99


def test_attention_function_is_registered_with_transformers() -> None:
    from transformers import AttentionInterface

    model = lphf.from_transformers(hf("hf-llama"))
    assert AttentionInterface._global_mapping["layerpass"] is lphf.layerpass_attention_forward
    assert model.hf_config._attn_implementation == "layerpass"


def test_attention_function_needs_a_converted_module() -> None:
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(TypeError, match="layerpass Attention at `module.attn`.*from_transformers"):
        lphf.layerpass_attention_forward(nn.Linear(2, 2), q, q, q, None)


def test_eager_call_checks_the_features_the_layer_was_built_with() -> None:
    model = build_model("hf-gemma2", num_layers=2)
    model.model.layers[0].self_attn.hf_attn.sliding_window = 4  # the HF module now passes another window
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.attn: the module passes sliding_window=4, "
                                         r"the layer was built with 8"):
        make_step(model, num_decodes=0, prefill_lens=[3]).run()


def test_a_norm_that_computes_something_else_stays_an_hf_module() -> None:
    """The norm probe: a subclass whose forward centres its input is not an RMS norm, so it runs
    as HF's module; the standard ones next to it still convert."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class CenteredNorm(LlamaRMSNorm):
        def forward(self, x):
            return super().forward(x - x.mean(-1, keepdim=True))

    ref = hf("hf-llama")
    for layer in ref.model.layers:
        old = layer.input_layernorm
        layer.input_layernorm = CenteredNorm(old.weight.shape[0], old.variance_epsilon)
        layer.input_layernorm.weight.data.copy_(old.weight)
    model = lphf.from_transformers(copy.deepcopy(ref))
    assert all(type(layer.input_layernorm) is CenteredNorm for layer in model.model.layers)
    assert all(type(layer.post_attention_layernorm) is lp.RMSNorm for layer in model.model.layers)
    matches_hf(ref, model, "llama with a centred norm")


def test_an_mlp_that_uses_its_input_elsewhere_is_not_packed() -> None:
    """The MLP probes: a gated MLP that also adds its input is neither ``silu_and_mul`` nor
    packable (its forward needs ``x`` itself); it keeps one parallel linear per projection."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    class ResidualMLP(LlamaMLP):
        def forward(self, x):
            return super().forward(x) + x

    ref = hf("hf-llama")
    for layer in ref.model.layers:
        old = layer.mlp
        layer.mlp = ResidualMLP(ref.config)
        layer.mlp.load_state_dict(old.state_dict())
    model = lphf.from_transformers(copy.deepcopy(ref))
    mlp = model.model.layers[0].mlp
    assert type(mlp) is ResidualMLP and type(mlp.gate_proj).__name__ == "ColumnParallelLinear"
    assert type(mlp.down_proj) is lp.RowParallelLinear
    matches_hf(ref, model, "llama with a residual MLP")


def test_a_gated_attention_is_not_packed() -> None:
    """Issue 29: an attention module whose gate reads ``hidden_states`` (AFMoE, Laguna, HRM: a
    ``gate_proj`` beside q/k/v) crashed at conversion: packing hands its forward the packed
    projections instead. It keeps one linear per projection and equals HF."""
    import transformers

    from tests.models.hf import family_sweep as fs

    hf_model, why = fs.build_reference("afmoe")
    assert hf_model is not None, why
    model = lphf.from_transformers(copy.deepcopy(hf_model))
    attn = model.model.layers[0].self_attn
    assert isinstance(attn, transformers.models.afmoe.modeling_afmoe.AfmoeAttention), type(attn)
    assert type(attn.q_proj).__name__ == "ColumnParallelLinear" and hasattr(attn, "gate_proj")
    matches_hf(hf_model, model, "afmoe (gated attention)")


def test_lora_wraps_the_packed_projections() -> None:
    """``packed_modules_mapping`` names the packed layers: LoRA wraps qkv_proj and gate_up_proj
    (with zero adapters the logits are the base model's)."""
    model = build_model("hf-qwen2", num_layers=2, seed=1)
    step = make_step(model, num_decodes=1, prefill_lens=[3], seed=1)
    ref = step.run()
    wrapped = lp.apply_lora(model, lp.LoRAConfig(max_lora_rank=4))
    names = {n.rsplit(".", 1)[-1] for n in wrapped}
    assert {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"} <= names
    torch.testing.assert_close(step.run(), ref, atol=1e-5, rtol=1e-5)


def test_local_checkpoint_directory(tmp_path) -> None:
    """The README's path: ``AutoModelForCausalLM.from_pretrained(dir)`` then ``from_transformers``;
    float32 equals HF eager, bfloat16 tracks it."""
    from transformers import AutoModelForCausalLM

    hf("hf-gemma2").save_pretrained(tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    matches_hf(ref, lphf.from_transformers(AutoModelForCausalLM.from_pretrained(tmp_path)), "gemma2 from a checkpoint dir")
    model = lphf.from_transformers(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16))
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.model.norm.weight.dtype == torch.float32  # 1 + w
    step = make_step(model, num_decodes=0, prefill_lens=[7], seed=1)
    x, y = step.run().float(), hf_logits(ref, step.requests[0].tokens)
    assert torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1] > 0.99


# -- what cannot be converted: one clear error per kind ---------------------------------------
def test_not_a_transformers_model() -> None:
    with pytest.raises(TypeError, match="takes a transformers PreTrainedModel"):
        lphf.from_transformers(nn.Linear(2, 2))


def test_encoder_decoder_is_refused() -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=16, num_layers=1, num_heads=2))
    with pytest.raises(lphf.UnsupportedArchitectureError, match="T5ForConditionalGeneration is an encoder-decoder model"):
        lphf.from_transformers(t5)


def test_not_a_causal_lm_is_refused() -> None:
    from transformers import LlamaForSequenceClassification

    clf = LlamaForSequenceClassification(_tiny_llama_config(num_labels=3))
    with pytest.raises(lphf.UnsupportedArchitectureError, match="LlamaForSequenceClassification is not a causal language model"):
        lphf.from_transformers(clf)
    with pytest.raises(lphf.UnsupportedArchitectureError, match="LlamaModel is not a causal language model"):
        lphf.from_transformers(hf("hf-llama").model)


def _tiny_llama_config(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, pad_token_id=0, **kw)


def test_multimodal_is_refused() -> None:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    cfg = Gemma3Config(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16),
                       vision_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          image_size=28, patch_size=14), mm_tokens_per_image=4)
    with pytest.raises(lphf.UnsupportedArchitectureError, match="is a multimodal model .*vision_config.*Gemma3ForCausalLM"):
        lphf.from_transformers(Gemma3ForConditionalGeneration(cfg))


def test_no_attention_interface_is_refused() -> None:
    from transformers import BloomConfig, BloomForCausalLM

    bloom = BloomForCausalLM(BloomConfig(vocab_size=32, hidden_size=16, n_layer=1, n_head=2))
    with pytest.raises(lphf.UnsupportedArchitectureError, match="BloomForCausalLM does not run its attention through "
                                                           "transformers' AttentionInterface"):
        lphf.from_transformers(bloom)


def test_recurrent_state_is_refused() -> None:
    """Before (transformers 5.25, no ``_is_stateful``): refused for lacking AttentionInterface instead."""
    from transformers import MambaConfig, MambaForCausalLM

    mamba = MambaForCausalLM(MambaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, state_size=4))
    with pytest.raises(lphf.UnsupportedArchitectureError, match="MambaForCausalLM has recurrent layers"):
        lphf.from_transformers(mamba)


def test_hybrid_recurrent_model_is_refused() -> None:
    """Granite 4 hybrid runs its attention layers through AttentionInterface: before, on transformers
    5.25, it passed the checks and its Mamba layers' state would have been silently dropped."""
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    cfg = GraniteMoeHybridConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, num_local_experts=0,
                                 shared_intermediate_size=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
                                 mamba_n_groups=1, layer_types=["mamba", "attention"])
    with pytest.raises(lphf.UnsupportedArchitectureError,
                       match=r"GraniteMoeHybridForCausalLM has recurrent layers \(state-space or linear attention; "
                             r"layer_types \['linear_attention'\]\)"):
        lphf.from_transformers(GraniteMoeHybridForCausalLM(cfg))


def test_lm_head_that_is_not_a_top_level_module_is_refused() -> None:
    """Before: a bare ``StopIteration`` (BERT's head is ``cls.predictions.decoder``)."""
    from transformers import BertConfig, BertLMHeadModel

    bert = BertLMHeadModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, is_decoder=True))
    with pytest.raises(lphf.UnsupportedArchitectureError,
                       match=r"BertLMHeadModel's language-model head \(get_output_embeddings\(\)\) is at "
                             r"'cls\.predictions\.decoder'; layerpass converts decoder-only \*ForCausalLM models whose "
                             r"head is a top-level torch\.nn\.Linear .*LlamaForCausalLM"):
        lphf.from_transformers(bert)


def test_attention_output_wider_than_the_output_projection_is_refused() -> None:
    """Helium builds ``o_proj`` hidden_size -> hidden_size, so num_heads * head_dim != hidden_size
    cannot run (HF's own forward fails too). Before: the dry run's bare matmul shape error."""
    from transformers import HeliumConfig, HeliumForCausalLM

    cfg = HeliumConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=128)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn' \(HeliumAttention\) returns 2 heads x head_dim "
                                         r"128 = 256 attention features, but its o_proj takes 64 \(config: head_dim=128, "
                                         r"num_attention_heads=2, hidden_size=64\)"):
        lphf.from_transformers(HeliumForCausalLM(cfg))


def test_bidirectional_attention_is_refused() -> None:
    from transformers import Gemma3TextConfig

    cfg = Gemma3TextConfig(**{**hf_config("hf-gemma3").to_dict(), "use_bidirectional_attention": True})
    with pytest.raises(lphf.UnsupportedModuleError, match=r"'model\.layers\.0\.self_attn' \(Gemma3Attention\) uses "
                                                     r"bidirectional attention"):
        lphf.from_transformers(lphf.build_hf_model(cfg))


def test_an_attention_module_shared_by_two_layers_is_refused() -> None:
    model = hf("hf-llama")
    model.model.layers[1].self_attn = model.model.layers[0].self_attn
    with pytest.raises(lphf.UnsupportedModuleError, match=r"'model\.layers\.1\.self_attn' is the same LlamaAttention as "
                                                     r"'model\.layers\.0\.self_attn'"):
        lphf.from_transformers(model)


def test_lm_head_must_be_a_linear() -> None:
    model = hf("hf-llama")
    model.lm_head = nn.Sequential(model.lm_head)
    with pytest.raises(lphf.UnsupportedModuleError, match="'lm_head' is a Sequential; expected torch.nn.Linear"):
        lphf.from_transformers(model)


def test_converting_twice_is_refused_and_a_converted_model_copies() -> None:
    ref = hf("hf-gemma2")
    model = lphf.from_transformers(ref)
    with pytest.raises(ValueError, match="Gemma2ForCausalLM was already converted"):
        lphf.from_transformers(ref)
    twin = copy.deepcopy(model)  # the wrappers read through to the HF modules, also half-built
    assert twin.model.layers[0].self_attn.sliding_window == 8 and twin.model.layers[0].mlp.hidden_size == 64


def test_quant_config_type_is_checked() -> None:
    with pytest.raises(TypeError, match="quant_config must be None or an Fp8Config"):
        lphf.from_transformers(hf("hf-llama"), quant_config="fp8")


# -- MoE --------------------------------------------------------------------------------------
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

    @lphf.TransformersFusedMoE.register_oot
    class CountingMoE(lphf.TransformersFusedMoE):
        calls = 0

        def forward(self, hidden_states, router_logits):
            CountingMoE.calls += 1
            return super().forward(hidden_states, router_logits)

    model = build_model("hf-qwen2-moe", num_layers=2, seed=4)
    experts = [layer.mlp.experts for layer in model.model.layers]
    assert all(type(e) is CountingMoE for e in experts)
    CountingMoE.calls = 0  # the conversion's dry run called them once
    step2 = make_step(model, num_decodes=1, prefill_lens=[3], seed=1)
    torch.testing.assert_close(step2.run(), ref, atol=1e-5, rtol=1e-5)
    assert CountingMoE.calls == 2 * 2  # two layers, history prefill + the step

    assert lp.FusedMoEWithLoRA.can_replace_layer(experts[0], lp.LoRAConfig(), ["gate_proj", "up_proj"])
    wrapped = lp.apply_lora(model, lp.LoRAConfig(max_lora_rank=4, target_modules=("experts",)))
    moe_wrappers = {n: w for n, w in wrapped.items() if n.endswith("mlp.experts")}
    assert len(moe_wrappers) == 2 and all(type(w) is lp.FusedMoEWithLoRA for w in moe_wrappers.values())
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
