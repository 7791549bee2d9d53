"""``moe`` / ``moe-fp8``: a Qwen2-MoE-like decoder. Every layer's MLP is a sparse block: a replicated router
gate, routed experts (``FusedMoE``) and a shared expert MLP scaled by a sigmoid gate."""

from __future__ import annotations

import torch
from torch import nn

from layerpass.layers import Fp8Config, FusedMoE, ReplicatedLinear

from .common import CausalLM, DecoderLayer, LlamaMLP
from .config import ModelConfig
from .registry import register_model


class SharedExpert(nn.Module):
    """``sigmoid(shared_expert_gate(x)) * mlp(x)``. The MLP does not all-reduce: the MoE layer adds
    this partial sum to its routed output and reduces once. The gate is replicated, so scaling a
    partial sum by it commutes with the reduction."""

    def __init__(self, config: ModelConfig, prefix: str) -> None:
        super().__init__()
        self.mlp = LlamaMLP(config, config.shared_expert_intermediate_size, prefix, reduce_results=False)
        self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1, bias=False, prefix=f"{prefix}.shared_expert_gate",
                                                   params_dtype=config.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.shared_expert_gate(x)) * self.mlp(x)


class SparseMoeBlock(nn.Module):
    def __init__(self, config: ModelConfig, prefix: str) -> None:
        super().__init__()
        c = config
        self.gate = ReplicatedLinear(c.hidden_size, c.num_experts, bias=False, prefix=f"{prefix}.gate", params_dtype=c.dtype)
        self.experts = FusedMoE(c.num_experts, c.top_k, c.hidden_size, c.moe_intermediate_size, c.norm_topk_prob,
                                prefix=f"{prefix}.experts", shared_experts=SharedExpert(c, f"{prefix}.shared_expert"),
                                params_dtype=c.dtype, quant_config=c.quant_config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.experts(hidden_states, self.gate(hidden_states))


def moe_layer(config: ModelConfig, prefix: str, index: int) -> nn.Module:
    return DecoderLayer(config, prefix, SparseMoeBlock(config, f"{prefix}.mlp"))


class MoeForCausalLM(CausalLM):
    # "experts" packs gate and up: two LoRA modules (FusedMoEWithLoRA); map it to one name for the 3D wrapper.
    packed_modules_mapping = {**CausalLM.packed_modules_mapping, "experts": ["gate_proj", "up_proj"]}


@register_model("moe")
def build_moe(config: ModelConfig) -> CausalLM:
    return MoeForCausalLM(config, moe_layer)


@register_model("moe-fp8", quant_config=Fp8Config())
def build_moe_fp8(config: ModelConfig) -> CausalLM:
    """``moe`` with static FP8 linears and FP8 routed experts (router gate unquantised)."""
    if config.quant_config is None:
        raise ValueError("moe-fp8 needs a quant_config (Fp8Config); use 'moe' for the unquantised model")
    return MoeForCausalLM(config, moe_layer)
