"""LoRA: the wrapper classes and ``apply_lora(model, lora_config)``.

``apply_lora`` walks the model, and for each layer asks the wrapper classes in order whether
they ``can_replace_layer(layer, config, packed_modules_list)``; the packed list of a module is
``packed_modules_mapping[last_name]`` (the model's class attribute unless given), else
``[last_name]``. The first wrapper that accepts replaces the module in its parent.
"""

from __future__ import annotations

from torch import nn

from .lora_base import BaseLayerWithLoRA, LoRAConfig, LoRASlice
from .lora_linear import (
    ColumnParallelLinearWithLoRA,
    MergedColumnParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA,
    RowParallelLinearWithLoRA,
)
from .lora_moe import FusedMoE3DWithLoRA, FusedMoEWithLoRA

LORA_CLASSES: tuple[type[BaseLayerWithLoRA], ...] = (
    ColumnParallelLinearWithLoRA,
    MergedColumnParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
    RowParallelLinearWithLoRA,
    FusedMoEWithLoRA,
    FusedMoE3DWithLoRA,
)


def apply_lora(model: nn.Module, lora_config: LoRAConfig,
               packed_modules_mapping: dict[str, list[str]] | None = None) -> dict[str, BaseLayerWithLoRA]:
    """Wrap every replaceable layer; returns ``{qualified module name: wrapper}`` of those wrapped."""
    if not isinstance(lora_config, LoRAConfig):
        raise TypeError(f"apply_lora needs a LoRAConfig, got {type(lora_config).__name__}")
    mapping = packed_modules_mapping if packed_modules_mapping is not None else getattr(model, "packed_modules_mapping", {})
    model_config = getattr(model, "config", None)
    # Children before parents (reverse pre-order): wrapping a parent (a MoE layer holding a shared
    # expert) keeps its already-wrapped children, and every recorded path stays valid.
    for name, module in reversed(list(model.named_modules())):
        if not name or isinstance(module, BaseLayerWithLoRA):
            continue
        parent_name, _, last = name.rpartition(".")
        if lora_config.target_modules is not None and last not in lora_config.target_modules:
            continue
        packed = list(mapping.get(last, [last]))
        for cls in LORA_CLASSES:
            if cls.can_replace_layer(module, lora_config, packed, model_config):
                wrapper = cls(module)
                wrapper.create_lora_weights(lora_config)
                setattr(model.get_submodule(parent_name) if parent_name else model, last, wrapper)
                break
    # Names in the final tree (a wrapped parent moves its children under ``base_layer``).
    return {n: m for n, m in model.named_modules() if isinstance(m, BaseLayerWithLoRA)}


__all__ = [
    "BaseLayerWithLoRA", "LoRAConfig", "LoRASlice", "ColumnParallelLinearWithLoRA", "MergedColumnParallelLinearWithLoRA",
    "QKVParallelLinearWithLoRA", "MergedQKVParallelLinearWithLoRA", "RowParallelLinearWithLoRA", "FusedMoEWithLoRA",
    "FusedMoE3DWithLoRA", "LORA_CLASSES", "apply_lora",
]
