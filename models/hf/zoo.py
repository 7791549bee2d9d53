"""Hugging Face models built from configs (random, seeded weights; nothing downloaded), and the
zoo names ``hf-llama``, ``hf-qwen2-moe``, ``hf-mixtral``, ``hf-qwen3-moe``.

Where transformers is installed, ``build_model("hf-llama", num_layers=...)`` maps the layerpass ``ModelConfig`` onto the HF config
of the family, builds the HF model with weights drawn from the build seed, and converts it in
``build_model``'s layer registry, so ``make_step`` and ``layerpass bench`` take it like any zoo model.
"""

from __future__ import annotations

import importlib.util
import math
import zlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from layerpass.layers.weights import current_init_seed
from layerpass.ops import current_registry

from ..config import ModelConfig
from ..registry import register_model
from .convert import TransformersForCausalLM, from_transformers


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
def _common(c: ModelConfig) -> dict[str, Any]:
    return dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
                num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads, head_dim=c.head_size,
                max_position_embeddings=c.max_position, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
                hidden_act="silu", tie_word_embeddings=False)


def llama_config(c: ModelConfig) -> Any:
    t = _require_transformers()
    return t.LlamaConfig(**_common(c), intermediate_size=c.intermediate_size, attention_bias=c.qkv_bias)


def qwen2_moe_config(c: ModelConfig) -> Any:
    t = _require_transformers()
    return t.Qwen2MoeConfig(**_common(c), intermediate_size=c.intermediate_size, qkv_bias=c.qkv_bias,
                            num_experts=c.num_experts, num_experts_per_tok=c.top_k,
                            moe_intermediate_size=c.moe_intermediate_size,
                            shared_expert_intermediate_size=c.shared_expert_intermediate_size,
                            norm_topk_prob=c.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[],
                            use_sliding_window=False)


def mixtral_config(c: ModelConfig) -> Any:
    t = _require_transformers()
    return t.MixtralConfig(**_common(c), intermediate_size=c.moe_intermediate_size, num_local_experts=c.num_experts,
                           num_experts_per_tok=c.top_k, sliding_window=None)


def qwen3_moe_config(c: ModelConfig) -> Any:
    t = _require_transformers()
    return t.Qwen3MoeConfig(**_common(c), intermediate_size=c.intermediate_size, attention_bias=c.qkv_bias,
                            num_experts=c.num_experts, num_experts_per_tok=c.top_k,
                            moe_intermediate_size=c.moe_intermediate_size, norm_topk_prob=c.norm_topk_prob,
                            decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False)


HF_ZOO: dict[str, Callable[[ModelConfig], Any]] = {
    "hf-llama": llama_config,
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


# Registered only where transformers is installed (found without importing it: that takes
# seconds), so zoo-wide tests and the bench never list a model they cannot build.
if importlib.util.find_spec("transformers") is not None:
    for _name, _make in HF_ZOO.items():
        register_model(_name)(_builder(_make))
