"""Hugging Face models built from configs (random, seeded weights; nothing downloaded), and the
zoo names ``hf-<family>`` (``HF_ZOO``: one per family in ``families.TESTED_ARCHITECTURES``).

Where transformers is installed, ``build_model("hf-llama", num_layers=...)`` maps the layerpass ``ModelConfig`` onto the HF config
of the family, builds the HF model with weights drawn from the build seed, and converts it in
``build_model``'s layer registry, so ``make_step`` and ``layerpass bench`` take it like any zoo model.
"""

from __future__ import annotations

import importlib.util
import math
import os
import zlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from layerpass.layers.weights import current_init_seed
from layerpass.ops import current_registry

from ..config import ModelConfig
from ..registry import ModelEntry, register_model, register_model_prefix
from .causal_lm import TransformersForCausalLM
from .convert import from_transformers


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("the Hugging Face backend needs transformers: pip install 'layerpass[transformers]'") from e
    return transformers


def randomize_weights(hf_model: nn.Module, seed: int = 0) -> nn.Module:
    """Redraw every parameter from ``(seed, parameter name)``: embeddings N(0, 1), matrices
    N(0, 1/fan_in), norm weights 1 + N(0, 0.1^2), biases N(0, 0.02^2).

    HF's own init (std 0.02, norms exactly one) gives near-zero logits; these are O(1), so a wrong
    weight, head or position shows up far above a 1e-4 comparison."""
    embeddings = {id(m.weight) for m in hf_model.modules() if isinstance(m, nn.Embedding)}
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if id(p) in embeddings:
                value = noise
            elif p.dim() >= 2:
                value = noise / math.sqrt(p.shape[-1])
            elif "norm" in name:
                value = 1.0 + 0.1 * noise
            else:
                value = 0.02 * noise
            p.copy_(value.to(p.dtype))
    return hf_model


def build_hf_model(hf_config: Any, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                   attn_implementation: str = "eager") -> nn.Module:
    """The HF ``*ForCausalLM`` of ``hf_config`` with seeded random weights, in ``dtype``, eval mode."""
    transformers = _require_transformers()
    with torch.random.fork_rng(devices=[]):  # HF's init draws from the global RNG: leave it as it was
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation=attn_implementation)
    return randomize_weights(model.to(dtype), seed).eval()


def from_config(hf_config: Any, *, seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs: Any) -> TransformersForCausalLM:
    """``from_transformers(build_hf_model(hf_config, seed=seed, dtype=dtype), **kwargs)``."""
    return from_transformers(build_hf_model(hf_config, seed=seed, dtype=dtype), **kwargs)


# -- zoo names ------------------------------------------------------------------------------
# Attention features are set so that they act on short test prompts: an 8-token sliding window,
# soft-caps near the logits' size, scales and multipliers away from their neutral values.
SLIDING_WINDOW = 8


def _rope(c: ModelConfig) -> dict[str, Any]:
    return {"rope_type": "default", "rope_theta": c.rope_theta}


def _common(c: ModelConfig) -> dict[str, Any]:
    return dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
                num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads, head_dim=c.head_size,
                max_position_embeddings=c.max_position, rms_norm_eps=c.rms_norm_eps, rope_parameters=_rope(c),
                tie_word_embeddings=False)


def _alternating(c: ModelConfig) -> list[str]:
    """Sliding and global attention alternating, sliding first (Gemma 2's pattern)."""
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(c.num_layers)]


def llama_config(c: ModelConfig) -> Any:
    t = _require_transformers()
    return t.LlamaConfig(**_common(c), hidden_act="silu", intermediate_size=c.intermediate_size, attention_bias=c.qkv_bias)


def qwen2_config(c: ModelConfig) -> Any:
    t = _require_transformers()  # q/k/v biases always (Qwen2's layout); full attention
    return t.Qwen2Config(**_common(c), hidden_act="silu", intermediate_size=c.intermediate_size, use_sliding_window=False)


def qwen3_config(c: ModelConfig) -> Any:
    t = _require_transformers()  # per-head q/k RMS norms
    return t.Qwen3Config(**_common(c), hidden_act="silu", intermediate_size=c.intermediate_size,
                         attention_bias=c.qkv_bias, use_sliding_window=False)


def mistral_config(c: ModelConfig) -> Any:
    t = _require_transformers()  # one sliding window on every layer
    return t.MistralConfig(**_common(c), hidden_act="silu", intermediate_size=c.intermediate_size,
                           sliding_window=SLIDING_WINDOW)


def gemma2_config(c: ModelConfig) -> Any:
    t = _require_transformers()  # 1 + w norms, scaled embedding, GELU MLP, alternating windows, soft-caps, tied head
    return t.Gemma2Config(**{**_common(c), "tie_word_embeddings": True}, hidden_activation="gelu_pytorch_tanh",
                          intermediate_size=c.intermediate_size, query_pre_attn_scalar=c.head_size + 8,
                          sliding_window=SLIDING_WINDOW, layer_types=_alternating(c), attn_logit_softcapping=5.0,
                          final_logit_softcapping=8.0)


def gemma3_config(c: ModelConfig) -> Any:
    t = _require_transformers()  # Gemma 2 plus q/k norms and a local rotary base for sliding layers; no soft-caps
    common = {**_common(c), "tie_word_embeddings": True,
              "rope_parameters": {"full_attention": {**_rope(c), "rope_theta": c.rope_theta * 100},
                                  "sliding_attention": _rope(c)}}
    return t.Gemma3TextConfig(**common, hidden_activation="gelu_pytorch_tanh", intermediate_size=c.intermediate_size,
                              query_pre_attn_scalar=c.head_size + 8, sliding_window=SLIDING_WINDOW,
                              layer_types=_alternating(c))


def phi3_config(c: ModelConfig) -> Any:
    t = _require_transformers()  # packed qkv_proj and gate_up_proj in the checkpoint
    return t.Phi3Config(**_common(c), hidden_act="silu", intermediate_size=c.intermediate_size, pad_token_id=0,
                        eos_token_id=None, sliding_window=None)


def olmo2_config(c: ModelConfig) -> Any:
    t = _require_transformers()  # full-width q/k norms, norms after attention and MLP
    return t.Olmo2Config(**_common(c), hidden_act="silu", intermediate_size=c.intermediate_size,
                         attention_bias=c.qkv_bias, pad_token_id=0, eos_token_id=None)


def granite_config(c: ModelConfig) -> Any:
    t = _require_transformers()  # embedding, residual, attention and logits multipliers
    return t.GraniteConfig(**_common(c), hidden_act="silu", intermediate_size=c.intermediate_size,
                           attention_bias=c.qkv_bias, embedding_multiplier=3.0, residual_multiplier=0.5,
                           attention_multiplier=0.2, logits_scaling=2.0)


def qwen2_moe_config(c: ModelConfig) -> Any:
    t = _require_transformers()
    return t.Qwen2MoeConfig(**_common(c), hidden_act="silu", intermediate_size=c.intermediate_size, qkv_bias=c.qkv_bias,
                            num_experts=c.num_experts, num_experts_per_tok=c.top_k,
                            moe_intermediate_size=c.moe_intermediate_size,
                            shared_expert_intermediate_size=c.shared_expert_intermediate_size,
                            norm_topk_prob=c.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[],
                            use_sliding_window=False)


def mixtral_config(c: ModelConfig) -> Any:
    t = _require_transformers()
    return t.MixtralConfig(**_common(c), hidden_act="silu", intermediate_size=c.moe_intermediate_size,
                           num_local_experts=c.num_experts, num_experts_per_tok=c.top_k, sliding_window=None)


def qwen3_moe_config(c: ModelConfig) -> Any:
    t = _require_transformers()
    return t.Qwen3MoeConfig(**_common(c), hidden_act="silu", intermediate_size=c.intermediate_size,
                            attention_bias=c.qkv_bias, num_experts=c.num_experts, num_experts_per_tok=c.top_k,
                            moe_intermediate_size=c.moe_intermediate_size, norm_topk_prob=c.norm_topk_prob,
                            decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False)


HF_ZOO: dict[str, Callable[[ModelConfig], Any]] = {
    "hf-llama": llama_config,
    "hf-qwen2": qwen2_config,
    "hf-qwen3": qwen3_config,
    "hf-mistral": mistral_config,
    "hf-gemma2": gemma2_config,
    "hf-gemma3": gemma3_config,
    "hf-phi3": phi3_config,
    "hf-olmo2": olmo2_config,
    "hf-granite": granite_config,
    "hf-qwen2-moe": qwen2_moe_config,
    "hf-mixtral": mixtral_config,
    "hf-qwen3-moe": qwen3_moe_config,
}


def _builder(make_config: Callable[[ModelConfig], Any]) -> Callable[[ModelConfig], nn.Module]:
    def build(config: ModelConfig) -> nn.Module:
        hf = build_hf_model(make_config(config), seed=current_init_seed(), dtype=config.dtype)
        # build_model's registry scope is open: the layers register there.
        return from_transformers(hf, cache_config=config.cache_config, quant_config=config.quant_config,
                                 num_state_slots=config.num_state_slots, registry=current_registry())

    build.__qualname__ = f"build_{make_config.__name__.removesuffix('_config')}"
    return build


HF_CONFIG_PREFIX = "hf-config:"


def config_file_model(path: str) -> ModelEntry:
    """The model ``hf-config:PATH``: the Hugging Face config at ``PATH`` (a ``config.json`` or a
    checkpoint directory holding one) with random weights, its real widths, ``num_layers`` decoder
    layers (per-layer lists such as ``layer_types`` follow the count)."""
    if not os.path.exists(path):
        raise ValueError(f"{HF_CONFIG_PREFIX}{path}: no such file or directory (a config.json or a checkpoint directory)")

    def make_config(c: ModelConfig) -> Any:
        cfg = _require_transformers().AutoConfig.from_pretrained(path)
        cfg.num_hidden_layers = c.num_layers
        for attr in ("layer_types", "mlp_only_layers"):
            value = getattr(cfg, attr, None)
            if isinstance(value, list) and value:
                setattr(cfg, attr, (value * c.num_layers)[:c.num_layers])
        return cfg

    make_config.__name__ = "config_file_config"
    # its widths are the file's, not the zoo config's: the converted model's own ModelConfig describes it
    return ModelEntry(_builder(make_config), ModelConfig, own_config=True)


# Registered only where transformers is installed (found without importing it: that takes
# seconds), so zoo-wide tests and the bench never list a model they cannot build.
if importlib.util.find_spec("transformers") is not None:
    for _name, _make in HF_ZOO.items():
        register_model(_name)(_builder(_make))
    register_model_prefix(HF_CONFIG_PREFIX, config_file_model)
