"""The Transformers backend: Hugging Face decoder models on layerpass layers and ops.

``from_transformers(hf_model)`` converts, in place, any decoder-only ``*ForCausalLM`` whose
attention goes through transformers' ``AttentionInterface`` (see ``families.py`` for how support
is decided, ``convert.py`` for what is swapped); ``from_config(hf_config)`` builds one with seeded
random weights first. Zoo names ``hf-<family>`` (``HF_ZOO``) register on import. Importing this
package does not import transformers (that happens on first use), so the core imports without
the ``transformers`` extra.
"""

from .attention import (
    ATTN_IMPLEMENTATION,
    PackedSlice,
    TransformersAttention,
    layerpass_attention_forward,
    register_attention_function,
)
from .causal_lm import TransformersForCausalLM
from .convert import from_transformers
from .families import (
    TESTED_ARCHITECTURES,
    UnsupportedArchitectureError,
    UnsupportedModuleError,
    check_convertible,
    supported_architectures,
)
from .layers import TransformersLMHead, TransformersScaledEmbedding
from .mlp import TransformersMLP, TransformersPackedMLP
from .model_config import model_config_from_hf
from .moe import TransformersFusedMoE, TransformersSharedExpert, TransformersSparseMoeBlock
from .zoo import HF_ZOO, build_hf_model, from_config, randomize_weights

__all__ = [
    "ATTN_IMPLEMENTATION", "PackedSlice", "TransformersAttention", "layerpass_attention_forward",
    "register_attention_function", "TransformersForCausalLM", "from_transformers", "model_config_from_hf",
    "TESTED_ARCHITECTURES", "UnsupportedArchitectureError", "UnsupportedModuleError", "check_convertible",
    "supported_architectures", "TransformersLMHead", "TransformersScaledEmbedding", "TransformersMLP",
    "TransformersPackedMLP", "TransformersFusedMoE", "TransformersSharedExpert", "TransformersSparseMoeBlock", "HF_ZOO",
    "build_hf_model", "from_config", "randomize_weights",
]
