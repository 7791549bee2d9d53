"""Out-of-tree layers: what build_model instantiates, that their forward runs, and LoRA on them."""

from __future__ import annotations

import pytest
import torch

from layerpass.layers import FusedMoE, LogitsProcessor, ParallelLMHead, QKVParallelLinear, VocabParallelEmbedding
from layerpass.models import build_model, make_step

CALLS: dict[str, int] = {}


def _counting(base: type) -> type:
    """An OOT subclass whose forward counts its calls and defers to the in-tree one."""

    def forward(self, *args, **kwargs):
        CALLS[base.__name__] = CALLS.get(base.__name__, 0) + 1
        return base.forward(self, *args, **kwargs)

    return type(f"Oot{base.__name__}", (base,), {"forward": forward})


OOT_TARGETS = [QKVParallelLinear, FusedMoE, VocabParallelEmbedding, ParallelLMHead, LogitsProcessor]


@pytest.fixture
def oot_classes(clean_oot):
    classes = {}
    for base in OOT_TARGETS:
        classes[base] = base.register_oot(_counting(base))
    CALLS.clear()
    yield classes


@pytest.mark.parametrize("name", ["llama", "moe"])
def test_build_model_instantiates_oot_layers(oot_classes, name):
    model = build_model(name, num_layers=2, seed=4)
    layers = model.model.layers
    assert type(layers[0].self_attn.qkv_proj) is oot_classes[QKVParallelLinear]
    assert type(model.model.embed_tokens) is oot_classes[VocabParallelEmbedding]
    assert type(model.lm_head) is oot_classes[ParallelLMHead]
    assert type(model.logits_processor) is oot_classes[LogitsProcessor]
    if name == "moe":
        assert type(layers[1].mlp.experts) is oot_classes[FusedMoE]
    # the op resolves the OOT instance by name: it is what registered under the prefix
    assert model.layer_registry.get("model.layers.0.self_attn.qkv_proj") is layers[0].self_attn.qkv_proj
    step = make_step(model, num_decodes=1, prefill_lens=[3], seed=2, history_lens=[4])
    CALLS.clear()
    assert torch.isfinite(step.run()).all()
    assert CALLS["QKVParallelLinear"] == 2 and CALLS["VocabParallelEmbedding"] == 1
    assert CALLS["ParallelLMHead"] == 1 and CALLS["LogitsProcessor"] == 1
    assert CALLS.get("FusedMoE", 0) == (2 if name == "moe" else 0)


@pytest.mark.parametrize("name", ["llama", "moe"])
def test_oot_model_matches_in_tree(clean_oot, name):
    plain = build_model(name, num_layers=2, seed=4)
    want = make_step(plain, num_decodes=2, prefill_lens=[3], seed=2).run()
    for base in OOT_TARGETS:
        base.register_oot(_counting(base))
    oot = build_model(name, num_layers=2, seed=4)
    assert type(oot.lm_head) is not ParallelLMHead
    torch.testing.assert_close(make_step(oot, num_decodes=2, prefill_lens=[3], seed=2).run(), want, atol=0, rtol=0)


@pytest.mark.parametrize("qkv_packed", [["q_proj", "k_proj", "v_proj"], ["qkv_proj"]])
def test_apply_lora_wraps_oot_qkv_and_moe(oot_classes, qkv_packed):
    from layerpass.layers import (FusedMoE3DWithLoRA, FusedMoEWithLoRA, LoRAConfig, MergedQKVParallelLinearWithLoRA,
                                  QKVParallelLinearWithLoRA, apply_lora)

    model = build_model("moe", num_layers=1, seed=0)
    qkv, moe = model.model.layers[0].self_attn.qkv_proj, model.model.layers[0].mlp.experts
    assert type(qkv) is not QKVParallelLinear and type(moe) is not FusedMoE  # exact in-tree checks would miss them
    mapping = {"qkv_proj": qkv_packed, "experts": ["gate_up_proj"] if len(qkv_packed) == 1 else ["w1", "w3"]}
    wrapped = apply_lora(model, LoRAConfig(max_lora_rank=2), packed_modules_mapping=mapping)
    w_qkv = wrapped["model.layers.0.self_attn.qkv_proj"]
    w_moe = wrapped["model.layers.0.mlp.experts"]
    assert type(w_qkv) is (QKVParallelLinearWithLoRA if len(qkv_packed) == 1 else MergedQKVParallelLinearWithLoRA)
    assert type(w_moe) is (FusedMoE3DWithLoRA if len(qkv_packed) == 1 else FusedMoEWithLoRA)
    assert w_qkv.base_layer is qkv and w_moe.base_layer is moe
    step = make_step(model, num_decodes=1, prefill_lens=[2], seed=0)
    CALLS.clear()
    step.run()
    assert CALLS["QKVParallelLinear"] == 1  # the wrapper calls the OOT layer's forward
