"""``ModuleWalker``: walks a Hugging Face model's module tree and swaps, in place, each module
layerpass runs (what is swapped, and when: ``convert.py``'s docstring)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from layerpass.layers import Fp8Config, PluggableLayer, VocabParallelEmbedding

from .attention import GatheredPacked, PackedSlice, TransformersAttention
from .conversion import Conversion, has_linears
from .convert_embedding import convert_embedding
from .convert_mlp import convert_mlp
from .convert_moe import convert_moe_block, moe_block_classes
from .convert_norm import convert_rms_norm
from .convert_qkv import convert_attention_qkv, convert_packed_qkv
from .families import UnsupportedModuleError
from .layers import TransformersLMHead, TransformersScaledEmbedding
from .mlp import TransformersMLP, TransformersPackedMLP
from .moe import TransformersSparseMoeBlock
from .probes import Probes
from .tp_plan import TPPlan

# modules the converter builds (their children are layerpass layers already)
CONVERTED = (TransformersAttention, TransformersMLP, TransformersPackedMLP, TransformersSparseMoeBlock, GatheredPacked,
             PackedSlice, TransformersLMHead, TransformersScaledEmbedding)


class ModuleWalker:
    """One conversion's walk. ``paths`` maps each HF module seen (by id) to its path in the model;
    ``converted_embedding`` is the input embedding's layerpass table, once converted (a tied LM
    head shares it)."""

    def __init__(self, hf_model: nn.Module, dtype: torch.dtype, quant_config: Fp8Config | None) -> None:
        config: Any = hf_model.config
        plan = TPPlan(getattr(config, "base_model_tp_plan", None), hf_model.base_model_prefix)
        self.conversion = Conversion(config, dtype, quant_config, plan, Probes(), self.convert_children)
        self.input_embedding = hf_model.get_input_embeddings()
        self.moe_blocks = moe_block_classes()
        self.paths: dict[int, str] = {}
        self.converted_embedding: VocabParallelEmbedding | None = None

    def convert_children(self, module: nn.Module, path: str) -> None:
        for name, child in list(module.named_children()):
            new = self.convert(child, f"{path}.{name}")
            if new is not None and new is not child:
                setattr(module, name, new)

    def convert(self, module: nn.Module, path: str) -> nn.Module | None:
        """The replacement of ``module`` (None: keep it; its children are converted)."""
        if isinstance(module, (PluggableLayer, *CONVERTED)):
            return None  # already a layerpass layer (or made of them)
        first = self.paths.get(id(module))
        if first is not None and any(True for _ in module.parameters()):
            raise UnsupportedModuleError(f"from_transformers: {path!r} is the same {type(module).__name__} as {first!r}; "
                                         f"layerpass gives every layer its own name and state (KV cache), so a module "
                                         f"with weights cannot be used at two places")
        self.paths[id(module)] = path
        conv = self.conversion
        fam = self.moe_blocks.get(type(module))
        if fam is not None:
            return convert_moe_block(conv, module, path, fam)
        if module is self.input_embedding:
            new, self.converted_embedding = convert_embedding(conv, module, path)
            return new
        if type(module) is nn.Linear:
            return conv.linear(module, path)
        if has_linears(module, "q_proj", "k_proj", "v_proj"):
            return convert_attention_qkv(conv, module, path)
        if has_linears(module, "down_proj") and (has_linears(module, "gate_proj", "up_proj")
                                                 or has_linears(module, "gate_up_proj")):
            return convert_mlp(conv, module, path)
        if has_linears(module, "qkv_proj") and isinstance(getattr(module, "head_dim", None), int):
            module.qkv_proj = convert_packed_qkv(conv, module, path)
        norm = convert_rms_norm(conv, module, path)
        if norm is not None:
            return norm
        self.convert_children(module, path)
        return None
