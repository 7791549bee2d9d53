"""``llama`` (dense GQA decoder) and ``llama-fp8`` (static per-tensor FP8 linears; LM head unquantised)."""

from __future__ import annotations

from torch import nn

from layerpass.layers import Fp8Config

from .common import CausalLM, DecoderLayer, LlamaMLP
from .config import ModelConfig
from .registry import register_model


def llama_layer(config: ModelConfig, prefix: str, index: int) -> nn.Module:
    return DecoderLayer(config, prefix, LlamaMLP(config, config.intermediate_size, f"{prefix}.mlp"))


@register_model("llama")
def build_llama(config: ModelConfig) -> CausalLM:
    return CausalLM(config, llama_layer)


@register_model("llama-fp8", quant_config=Fp8Config())
def build_llama_fp8(config: ModelConfig) -> CausalLM:
    if config.quant_config is None:
        raise ValueError("llama-fp8 needs a quant_config (Fp8Config); use 'llama' for the unquantised model")
    return CausalLM(config, llama_layer)
