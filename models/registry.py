"""Model registry: ``@register_model("llama")`` and ``build_model(name, *, num_layers, seed, **overrides)``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from layerpass.layers import init_seed_scope
from layerpass.ops import LayerRegistry, layer_registry_scope

from .config import ModelConfig
from .allocator import IdAllocator

Builder = Callable[[ModelConfig], nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    builder: Builder
    config_cls: type[ModelConfig]
    defaults: dict[str, Any] = field(default_factory=dict)


_MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, *, config_cls: type[ModelConfig] = ModelConfig, **defaults: Any) -> Callable[[Builder], Builder]:
    """Register ``builder(config) -> nn.Module`` as zoo model ``name``; ``defaults`` are config overrides
    applied before the caller's (e.g. ``quant_config=Fp8Config()`` for ``llama-fp8``)."""

    def decorate(builder: Builder) -> Builder:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered (by {_MODELS[name].builder.__qualname__})")
        unknown = set(defaults) - set(config_cls.field_names())
        if unknown:
            raise ValueError(f"register_model({name!r}): unknown config fields {sorted(unknown)}")
        _MODELS[name] = ModelEntry(builder, config_cls, dict(defaults))
        return builder

    return decorate


def registered_models() -> list[str]:
    return sorted(_MODELS)


def build_model(name: str, *, num_layers: int, seed: int = 0, **overrides: Any) -> nn.Module:
    """Build zoo model ``name`` with deterministic weights from ``seed``.

    The layers register in a fresh layer registry, stored as ``model.layer_registry``; the model
    also gets ``config``, ``cache_config``, ``block_allocator`` and ``state_allocator``."""
    entry = _MODELS.get(name)
    if entry is None:
        raise KeyError(f"unknown model {name!r}; known models: {registered_models()}")
    allowed = entry.config_cls.field_names()
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise TypeError(f"build_model({name!r}): unknown overrides {unknown}; allowed: {allowed}")
    config = entry.config_cls(**{**entry.defaults, **overrides, "num_layers": num_layers})
    with layer_registry_scope(LayerRegistry(label=name)) as registry, init_seed_scope(seed):
        model = entry.builder(config)
    model.layer_registry = registry
    model.config = config
    model.cache_config = config.cache_config
    model.block_allocator = IdAllocator(config.num_blocks, "KV cache block")
    model.state_allocator = IdAllocator(config.num_state_slots, "recurrent state slot")
    return model.eval()
