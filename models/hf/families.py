"""Which Hugging Face models ``from_transformers`` converts, and the clear errors for the others.

Support is decided by what the model IS, not by a list of names: any decoder-only causal LM
whose attention goes through transformers' ``AttentionInterface`` (its class sets
``_supports_attention_backend``) converts, the way vLLM's Transformers backend decides.
``check_convertible`` refuses the rest, one reason per kind (``UnsupportedArchitectureError``).

Dense layers need no per-family code. MoE blocks do (HF keeps their router and experts in
per-family classes with per-family routing rules): ``MOE_FAMILIES`` names the sparse block
classes that ``moe.py`` converts; other MoE blocks stay HF modules.

``TESTED_ARCHITECTURES`` lists the families checked here against HF eager, generation, compile
(``tests/models/hf``); each has an ``hf-<family>`` zoo name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

# architecture -> zoo name; every one is checked by tests/models/hf against HF eager and generate()
TESTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "hf-llama",
    "Qwen2ForCausalLM": "hf-qwen2",
    "Qwen3ForCausalLM": "hf-qwen3",
    "MistralForCausalLM": "hf-mistral",
    "Gemma2ForCausalLM": "hf-gemma2",
    "Gemma3ForCausalLM": "hf-gemma3",
    "Phi3ForCausalLM": "hf-phi3",
    "Olmo2ForCausalLM": "hf-olmo2",
    "GraniteForCausalLM": "hf-granite",
    "Qwen2MoeForCausalLM": "hf-qwen2-moe",
    "MixtralForCausalLM": "hf-mixtral",
    "Qwen3MoeForCausalLM": "hf-qwen3-moe",
}


@dataclass(frozen=True)
class MoeFamily:
    """A sparse MoE block class the converter runs on ``TransformersFusedMoE``."""

    module: str  # transformers.models.<...>.modeling_<...>
    block: str  # the sparse block's class name
    # whether the top-k routing weights are renormalised to sum to one
    renormalize: Callable[[Any], bool] = lambda config: bool(getattr(config, "norm_topk_prob", False))

    def cls(self) -> type:
        return getattr(importlib.import_module(self.module), self.block)


MOE_FAMILIES: tuple[MoeFamily, ...] = (
    MoeFamily("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeSparseMoeBlock"),
    MoeFamily("transformers.models.mixtral.modeling_mixtral", "MixtralSparseMoeBlock",
              renormalize=lambda config: True),  # Mixtral always renormalises its top-k
    MoeFamily("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock"),
)


# transformers' cache layer types (cache_utils.DYNAMIC_LAYER_TYPE_MAPPING) for conv / SSM / linear-attention
# state: Mamba, Jamba, Qwen3-Next, ...
RECURRENT_LAYER_TYPES = frozenset({"conv", "linear_attention", "hybrid", "hybrid_sliding"})


def supported_architectures() -> list[str]:
    """The architectures tested against HF (any other AttentionInterface decoder converts too)."""
    return sorted(TESTED_ARCHITECTURES)


class UnsupportedArchitectureError(NotImplementedError):
    """The Hugging Face model is not one ``from_transformers`` can run (the message says why)."""


class UnsupportedModuleError(NotImplementedError):
    """A module inside an otherwise convertible model that layerpass cannot run correctly."""


def _name(model: Any) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def _modality_configs(config: Any) -> list[str]:
    names = []
    for key in getattr(config, "sub_configs", {}) or {}:
        if any(m in key for m in ("vision", "audio", "speech", "image", "video")) and getattr(config, key, None) is not None:
            names.append(key)
    return names


def _recurrent_layer_types(config: Any) -> list[str]:
    """The config's ``layer_types`` whose transformers cache holds recurrent state, not KV."""
    text = getattr(config, "get_text_config", lambda: config)()
    types = getattr(text, "layer_types", None)
    return sorted(set(types) & RECURRENT_LAYER_TYPES) if isinstance(types, (list, tuple)) else []


def check_convertible(hf_model: Any) -> None:
    """Raise ``UnsupportedArchitectureError`` (``TypeError`` for a non-transformers object) naming
    why ``hf_model`` cannot run on layerpass; return if it is a convertible decoder-only causal LM."""
    try:
        from transformers import GenerationMixin, PreTrainedModel
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("the Hugging Face backend needs transformers: pip install 'layerpass[transformers]'") from e
    if not isinstance(hf_model, nn.Module) or not isinstance(hf_model, PreTrainedModel):
        raise TypeError(f"from_transformers takes a transformers PreTrainedModel (e.g. from "
                        f"AutoModelForCausalLM.from_pretrained), got {type(hf_model).__qualname__}")
    arch, config = _name(hf_model), hf_model.config
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedArchitectureError(
            f"from_transformers: {arch} is an encoder-decoder model; layerpass runs decoder-only causal LMs")
    if not isinstance(hf_model, GenerationMixin) or hf_model.get_output_embeddings() is None:
        raise UnsupportedArchitectureError(
            f"from_transformers: {arch} is not a causal language model (no language-model head to generate with); "
            f"load it with AutoModelForCausalLM")
    modalities = _modality_configs(config)
    if modalities:
        raise UnsupportedArchitectureError(
            f"from_transformers: {arch} is a multimodal model ({', '.join(modalities)}); layerpass runs text decoders: "
            f"load the text model alone (e.g. Gemma3ForCausalLM for Gemma 3)")
    recurrent = _recurrent_layer_types(config)
    if recurrent or getattr(hf_model, "_is_stateful", False):  # _is_stateful: set up to 5.17 at least, gone in 5.25
        kinds = f"; layer_types {recurrent}" if recurrent else ""
        raise UnsupportedArchitectureError(
            f"from_transformers: {arch} has recurrent layers (state-space or linear attention{kinds}) whose state "
            f"transformers keeps in its own cache; layerpass only pages attention KV")
    if not getattr(hf_model, "_supports_attention_backend", False):
        raise UnsupportedArchitectureError(
            f"from_transformers: {arch} does not run its attention through transformers' AttentionInterface "
            f"(its class does not set _supports_attention_backend), so layerpass cannot plug its attention in")
    base = getattr(hf_model, "base_model", None)
    if base is None or base is hf_model:
        raise UnsupportedArchitectureError(f"from_transformers: {arch} has no base model "
                                           f"({type(hf_model).__qualname__}.base_model_prefix names none)")
