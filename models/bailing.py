"""``bailing-hybrid``: a Bailing-MoE-linear style hybrid decoder.

Layers alternate linear attention (``BailingMoELinearAttention``, recurrent state per
sequence) and softmax attention (paged KV cache): layer ``i`` is softmax attention when
``(i + 1) % layer_group_size == 0``, linear otherwise (``layer_group_size=2``: linear, softmax,
linear, ...). Every MLP is a MoE block with an always-on shared expert. The LM head is
registered as exactly ``"lm_head"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from layerpass.layers import FusedMoE, ReplicatedLinear
from layerpass.layers.linear_attention import BailingMoELinearAttention

from .common import CausalLM, DecoderLayer, LlamaMLP
from .config import ModelConfig, is_positive_int
from .registry import register_model


@dataclass(frozen=True)
class BailingConfig(ModelConfig):
    """``ModelConfig`` plus the hybrid's knobs.

    - ``layer_group_size``: every ``layer_group_size``-th layer is softmax attention (1: all softmax).
    - ``linear_state_dtype``: dtype of the recurrent state caches (``None``: the model dtype).
    - ``linear_block_size``: prefill chunk length of the linear-attention op.
    - ``linear_norm_groups``: groups of heads the gated output norm normalises over.
    - ``use_qk_norm``: per-head RMS norm of q and k before rotary.
    """

    layer_group_size: int = 2
    linear_state_dtype: torch.dtype | None = None
    linear_block_size: int = 64
    linear_norm_groups: int = 1
    use_qk_norm: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [f"{n}={getattr(self, n)!r}" for n in ("layer_group_size", "linear_block_size", "linear_norm_groups")
               if not is_positive_int(getattr(self, n))]
        if bad:
            raise ValueError(f"BailingConfig fields must be positive ints: {', '.join(bad)}")
        if self.num_heads % self.linear_norm_groups:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by linear_norm_groups ({self.linear_norm_groups})")
        s = self.linear_state_dtype
        if s is not None and not (isinstance(s, torch.dtype) and s.is_floating_point):
            raise ValueError(f"linear_state_dtype must be None (the model dtype) or a float torch.dtype, got {s!r}")

    def is_linear_layer(self, index: int) -> bool:
        return (index + 1) % self.layer_group_size != 0


class BailingMoeBlock(nn.Module):
    """Router -> top-k routed experts + a shared expert (summed before the one all-reduce)."""

    def __init__(self, config: ModelConfig, prefix: str) -> None:
        super().__init__()
        c = config
        self.gate = ReplicatedLinear(c.hidden_size, c.num_experts, bias=False, prefix=f"{prefix}.gate", params_dtype=c.dtype)
        shared = LlamaMLP(c, c.shared_expert_intermediate_size, f"{prefix}.shared_experts", reduce_results=False)
        self.experts = FusedMoE(c.num_experts, c.top_k, c.hidden_size, c.moe_intermediate_size, c.norm_topk_prob,
                                prefix=f"{prefix}.experts", shared_experts=shared, params_dtype=c.dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.experts(hidden_states, self.gate(hidden_states))


def bailing_layer(config: BailingConfig, prefix: str, index: int) -> nn.Module:
    c = config
    mlp = BailingMoeBlock(c, f"{prefix}.mlp")
    if not c.is_linear_layer(index):
        return DecoderLayer(c, prefix, mlp)  # softmax attention (LlamaAttention)
    attn = BailingMoELinearAttention(
        c.hidden_size, c.num_heads, c.head_size, layer_idx=index, num_layers=c.num_layers,
        num_state_slots=c.num_state_slots, state_dtype=c.linear_state_dtype, block_size=c.linear_block_size,
        use_qk_norm=c.use_qk_norm, norm_groups=c.linear_norm_groups, rms_norm_eps=c.rms_norm_eps,
        max_position=c.max_position, rope_theta=c.rope_theta, quant_config=c.quant_config, params_dtype=c.dtype,
        prefix=f"{prefix}.self_attn",
    )
    return DecoderLayer(c, prefix, mlp, self_attn=attn)


@register_model("bailing-hybrid", config_cls=BailingConfig)
def build_bailing_hybrid(config: BailingConfig) -> CausalLM:
    return CausalLM(config, bailing_layer)
