"""layerpass.layers: thin ``PluggableLayer`` modules over the ops, replaceable out of tree."""

from .activation import SiluAndMul
from .attention import Attention, CacheConfig
from .distributed import (
    get_tp_rank,
    get_tp_world_size,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from .fused_moe import FusedMoE
from .layernorm import RMSNorm
from .linear_attention import BailingMoELinearAttention, BailingRMSNormGated, linear_attention_slopes
from .linear import (
    ColumnParallelLinear,
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from .linear_methods import Fp8Config, Fp8LinearMethod, UnquantizedLinearMethod, get_linear_method
from .logits_processor import LogitsProcessor
from .lora import (
    LORA_CLASSES,
    BaseLayerWithLoRA,
    ColumnParallelLinearWithLoRA,
    FusedMoE3DWithLoRA,
    FusedMoEWithLoRA,
    LoRAConfig,
    MergedColumnParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA,
    RowParallelLinearWithLoRA,
    apply_lora,
)
from .pluggable import PluggableLayer, in_tree_layers, maybe_get_oot_by_class, oot_layers
from .rotary_embedding import RotaryEmbedding
from .vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from .weights import init_seed_scope

__all__ = [
    "SiluAndMul", "Attention", "CacheConfig", "get_tp_rank", "get_tp_world_size",
    "tensor_model_parallel_all_gather", "tensor_model_parallel_all_reduce", "FusedMoE", "RMSNorm",
    "ColumnParallelLinear", "LinearBase", "MergedColumnParallelLinear", "QKVParallelLinear",
    "ReplicatedLinear", "RowParallelLinear", "Fp8Config", "Fp8LinearMethod", "UnquantizedLinearMethod",
    "get_linear_method", "LogitsProcessor", "PluggableLayer", "in_tree_layers", "maybe_get_oot_by_class",
    "oot_layers", "LORA_CLASSES", "BaseLayerWithLoRA", "ColumnParallelLinearWithLoRA", "FusedMoE3DWithLoRA",
    "FusedMoEWithLoRA", "LoRAConfig", "MergedColumnParallelLinearWithLoRA", "MergedQKVParallelLinearWithLoRA",
    "QKVParallelLinearWithLoRA", "RowParallelLinearWithLoRA", "apply_lora", "RotaryEmbedding", "ParallelLMHead", "VocabParallelEmbedding", "init_seed_scope",
    "BailingMoELinearAttention", "BailingRMSNormGated", "linear_attention_slopes",
]
