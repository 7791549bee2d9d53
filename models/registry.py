"""Model registry: ``@register_model("llama")`` and ``build_model(name, *, num_layers, seed, **overrides)``.

Besides registered names, a *parametrised* family answers every name that starts with its prefix
(``register_model_prefix``): ``hf-config:PATH`` builds the Hugging Face config at ``PATH``."""

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
    own_config: bool = False  # the built model describes itself (``model.config``), e.g. one made from a config file


_MODELS: dict[str, ModelEntry] = {}
_PREFIXES: dict[str, Callable[[str], ModelEntry]] = {}  # "hf-config:" -> entry for the rest of the name


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


def register_model_prefix(prefix: str, entry_for: Callable[[str], ModelEntry]) -> None:
    """Names ``prefix + arg`` build ``entry_for(arg)`` (which raises ``ValueError`` for a bad ``arg``)."""
    if prefix in _PREFIXES:
        raise ValueError(f"model prefix {prefix!r} is already registered")
    _PREFIXES[prefix] = entry_for


def registered_models() -> list[str]:
    """The registered names (prefix families not included: ``model_prefixes``)."""
    return sorted(_MODELS)


def model_prefixes() -> list[str]:
    return sorted(_PREFIXES)


def model_entry(name: str) -> ModelEntry:
    """The entry that builds ``name``; ``KeyError`` naming the known models, ``ValueError`` for a
    prefix family's bad argument (a config path that does not exist)."""
    entry = _MODELS.get(name)
    if entry is not None:
        return entry
    for prefix, entry_for in _PREFIXES.items():
        if name.startswith(prefix):
            return entry_for(name[len(prefix):])
    raise KeyError(f"unknown model {name!r}; known models: {registered_models()}, or a name starting with one of "
                   f"{model_prefixes()}")


def build_model(name: str, *, num_layers: int, seed: int = 0, **overrides: Any) -> nn.Module:
    """Build zoo model ``name`` with deterministic weights from ``seed``.

    The layers register in a fresh layer registry, stored as ``model.layer_registry``; the model
    also gets ``config``, ``cache_config``, ``block_allocator`` and ``state_allocator``."""
    entry = model_entry(name)
    allowed = entry.config_cls.field_names()
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise TypeError(f"build_model({name!r}): unknown overrides {unknown}; allowed: {allowed}")
    config = entry.config_cls(**{**entry.defaults, **overrides, "num_layers": num_layers})
    with layer_registry_scope(LayerRegistry(label=name)) as registry, init_seed_scope(seed):
        model = entry.builder(config)
    model.layer_registry = registry
    if not entry.own_config:
        model.config = config
    model.cache_config = config.cache_config
    model.block_allocator = IdAllocator(config.num_blocks, "KV cache block")
    model.state_allocator = IdAllocator(config.num_state_slots, "recurrent state slot")
    return model.eval()
