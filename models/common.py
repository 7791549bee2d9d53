"""Building blocks of the zoo's decoder-only models (vLLM-style residual stream).

``CausalLM(config, make_layer)`` is ``embed -> layers -> final norm -> LM head -> logits``; each
model supplies ``make_layer(config, prefix, index) -> nn.Module`` whose forward is
``(positions, hidden, residual) -> (hidden, residual)`` (``residual`` is None at layer 0).
Prefixes follow the HF names: ``model.embed_tokens``, ``model.layers.{i}.…``, ``model.norm``, ``lm_head``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from layerpass.layers import (
    Attention,
    LogitsProcessor,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    SiluAndMul,
    VocabParallelEmbedding,
)
from layerpass.ops.step_inputs import check_step_inputs, max_position

from .config import ModelConfig

LayerFactory = Callable[[ModelConfig, str, int], nn.Module]


class LlamaAttention(nn.Module):
    """qkv_proj -> rotary -> attention -> o_proj (static FP8 on both linears under ``quant_config``)."""

    def __init__(self, config: ModelConfig, prefix: str) -> None:
        super().__init__()
        c = config
        self.qkv_proj = QKVParallelLinear(c.hidden_size, c.head_size, c.num_heads, c.num_kv_heads, bias=c.qkv_bias,
                                          quant_config=c.quant_config, prefix=f"{prefix}.qkv_proj", params_dtype=c.dtype)
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(c.num_heads * c.head_size, c.hidden_size, bias=False, quant_config=c.quant_config,
                                        prefix=f"{prefix}.o_proj", params_dtype=c.dtype)
        self.rotary_emb = RotaryEmbedding(c.head_size, max_position=c.max_position, base=c.rope_theta,
                                          prefix=f"{prefix}.rotary_emb")
        self.attn = Attention(self.qkv_proj.num_heads, c.head_size, c.head_size ** -0.5, self.qkv_proj.num_kv_heads,
                              prefix=f"{prefix}.attn", cache=c.cache_config, dtype=c.dtype)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class LlamaMLP(nn.Module):
    """gate_up_proj -> SiLU-and-mul -> down_proj. ``reduce_results=False`` leaves the tensor-parallel
    sum to the caller (a MoE block's shared expert)."""

    def __init__(self, config: ModelConfig, intermediate_size: int, prefix: str, reduce_results: bool = True) -> None:
        super().__init__()
        c = config
        self.gate_up_proj = MergedColumnParallelLinear(c.hidden_size, [intermediate_size] * 2, bias=False,
                                                       quant_config=c.quant_config, prefix=f"{prefix}.gate_up_proj",
                                                       params_dtype=c.dtype)
        self.act_fn = SiluAndMul(prefix=f"{prefix}.act_fn")
        self.down_proj = RowParallelLinear(intermediate_size, c.hidden_size, bias=False, reduce_results=reduce_results,
                                           quant_config=c.quant_config, prefix=f"{prefix}.down_proj", params_dtype=c.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm block; the residual add is fused into the norms (``fused_add_rms_norm``)."""

    def __init__(self, config: ModelConfig, prefix: str, mlp: nn.Module, self_attn: nn.Module | None = None) -> None:
        super().__init__()
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.dtype, prefix=f"{prefix}.input_layernorm")
        self.self_attn = self_attn if self_attn is not None else LlamaAttention(c, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.dtype,
                                                prefix=f"{prefix}.post_attention_layernorm")
        self.mlp = mlp

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig, make_layer: LayerFactory, prefix: str = "model") -> None:
        super().__init__()
        c = config
        self.embed_tokens = VocabParallelEmbedding(c.vocab_size, c.hidden_size, params_dtype=c.dtype,
                                                   prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(make_layer(c, f"{prefix}.layers.{i}", i) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.dtype, prefix=f"{prefix}.norm")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        # the first layer gets a zero residual, not None: fused_add_rms_norm(x, 0) is exactly
        # (rms_norm(x), x), and every layer then takes the same arguments, so layerpass.compile
        # traces and compiles one region for all of them instead of one for the first and one for the rest
        residual = torch.zeros_like(hidden_states)
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class CausalLM(nn.Module):
    """``forward(input_ids [T], positions [T]) -> logits [T, vocab_size]``."""

    # Packed linears -> the checkpoint modules they hold (LoRA's packed_modules_list).
    packed_modules_mapping: dict[str, list[str]] = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    def __init__(self, config: ModelConfig, make_layer: LayerFactory) -> None:
        super().__init__()
        self.model = DecoderModel(config, make_layer)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, params_dtype=config.dtype, prefix="lm_head")
        self.logits_processor = LogitsProcessor(config.vocab_size, prefix="logits_processor")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # checked on every path: here in eager; compiled, by the op whose output the model goes on
        # with, on the real tensors (ops/step_inputs.py)
        input_ids = check_step_inputs(input_ids, positions, max_position=max_position(self))
        return self.logits_processor(self.lm_head, self.model(input_ids, positions))
