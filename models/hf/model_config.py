"""``model_config_from_hf``: the layerpass ``ModelConfig`` of a converted Hugging Face model."""

from __future__ import annotations

from typing import Any

import torch

from layerpass.layers import Attention, CacheConfig, Fp8Config

from ..config import ModelConfig


def _count(config: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def model_config_from_hf(hf_config: Any, dtype: torch.dtype, cache_config: CacheConfig, num_state_slots: int,
                         quant_config: Fp8Config | None, attention: Attention | None = None) -> ModelConfig:
    """The layerpass ``ModelConfig`` describing a converted model (what ``make_step`` and the bench
    read); ``attention``: one of its layers (head geometry, when the config does not say)."""
    c = getattr(hf_config, "get_text_config", lambda: hf_config)()
    hidden = c.hidden_size
    heads = _count(c, "num_attention_heads", default=attention.num_heads if attention is not None else 1)
    kv_heads = _count(c, "num_key_value_heads", default=heads)
    head_size = _count(c, "head_dim", default=attention.head_size if attention is not None else hidden // heads)
    num_experts = _count(c, "num_experts", "num_local_experts")
    moe: dict[str, Any] = {}
    if num_experts:
        moe = {"num_experts": num_experts, "top_k": c.num_experts_per_tok,
               "moe_intermediate_size": _count(c, "moe_intermediate_size", "intermediate_size"),
               "norm_topk_prob": bool(getattr(c, "norm_topk_prob", True))}
        if getattr(c, "shared_expert_intermediate_size", None):
            moe["shared_expert_intermediate_size"] = c.shared_expert_intermediate_size
    rope = getattr(c, "rope_parameters", None) or {}
    if not isinstance(rope, dict) or "rope_theta" not in rope:  # per-layer-type parameters (Gemma 3)
        rope = next((v for v in (rope.values() if isinstance(rope, dict) else []) if isinstance(v, dict)), {})
    return ModelConfig(
        num_layers=c.num_hidden_layers, vocab_size=c.vocab_size, hidden_size=hidden, num_heads=heads,
        num_kv_heads=kv_heads, head_size=head_size, intermediate_size=_count(c, "intermediate_size", default=4 * hidden),
        rms_norm_eps=float(_count(c, "rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", default=1e-6)),
        rope_theta=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))),
        max_position=_count(c, "max_position_embeddings", default=4096),
        qkv_bias=bool(getattr(c, "qkv_bias", False) or getattr(c, "attention_bias", False)), dtype=dtype,
        num_blocks=cache_config.num_blocks, block_size=cache_config.block_size, num_state_slots=num_state_slots,
        quant_config=quant_config, **moe,
    )
