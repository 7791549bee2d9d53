"""The Transformers backend: Hugging Face decoder models on layerpass layers and ops.

``from_transformers(hf_model)`` converts a supported ``*ForCausalLM`` (see
``supported_architectures()``) in place; ``from_config(hf_config)`` builds one with seeded random
weights first. Zoo names ``hf-llama``, ``hf-qwen2-moe``, ``hf-mixtral``, ``hf-qwen3-moe`` register
on import. Importing this package does not import transformers (that happens on first use), so
the core imports without the ``transformers`` extra.
"""

from .attention import ATTN_IMPLEMENTATION, TransformersAttention, layerpass_attention_forward, register_attention_function
from .convert import TransformersForCausalLM, from_transformers, model_config_from_hf
from .families import UnsupportedArchitectureError, UnsupportedModuleError, supported_architectures
from .mlp import TransformersMLP
from .moe import TransformersFusedMoE, TransformersSharedExpert, TransformersSparseMoeBlock
from .zoo import HF_ZOO, build_hf_model, from_config, randomize_weights

__all__ = [
    "ATTN_IMPLEMENTATION", "TransformersAttention", "layerpass_attention_forward", "register_attention_function",
    "TransformersForCausalLM", "from_transformers", "model_config_from_hf", "UnsupportedArchitectureError",
    "UnsupportedModuleError", "supported_architectures", "TransformersMLP", "TransformersFusedMoE",
    "TransformersSharedExpert", "TransformersSparseMoeBlock", "HF_ZOO", "build_hf_model", "from_config",
    "randomize_weights",
]
