"""Deterministic weight initialisation, keyed by name (no downloads, no checkpoint).

Every tensor is drawn in FULL (unsharded) from a generator seeded by
``(scope seed, layer prefix, tensor name)`` and then sliced to the rank's shard. So a
tensor's value does not depend on construction order, and 1 rank and N ranks hold the same
numbers: tensor-parallel results are comparable with single-process ones.
"""

from __future__ import annotations

import contextlib
import contextvars
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

_init_seed: contextvars.ContextVar[int] = contextvars.ContextVar("layerpass_init_seed", default=0)


@contextlib.contextmanager
def init_seed_scope(seed: int) -> Iterator[int]:
    """Layers constructed inside draw their weights from ``seed``."""
    if not isinstance(seed, int):
        raise TypeError(f"init seed must be an int, got {type(seed).__name__}: {seed!r}")
    token = _init_seed.set(seed)
    try:
        yield seed
    finally:
        _init_seed.reset(token)


def current_init_seed() -> int:
    return _init_seed.get()


def _generator(*key: object) -> torch.Generator:
    text = "/".join(str(k) for k in (current_init_seed(), *key))
    return torch.Generator().manual_seed(zlib.crc32(text.encode()))


def init_normal(prefix: str, name: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> torch.Tensor:
    """Full float32 tensor ``mean + std * N(0, 1)``, reproducible from (seed, prefix, name)."""
    return torch.randn(shape, generator=_generator(prefix, name), dtype=torch.float32) * std + mean


def check_fp8_scales(layer: nn.Module, names: Sequence[str], scales: dict[str, Any] | None = None) -> None:
    """Each named FP8 scale of ``layer`` (or of ``scales``, the values about to be loaded) is finite
    and > 0; a ``ValueError`` names the layer and the parameter. Reads the values: call it at
    construction and load time, never in forward."""
    from layerpass.ops.quant import check_scale_value

    source = scales if scales is not None else {n: getattr(layer, n, None) for n in names}
    for name in names:
        value = source.get(name)
        if isinstance(value, torch.Tensor) and value.device.type != "meta":
            check_scale_value(value, f"layer {getattr(layer, 'prefix', '') or type(layer).__name__!r}: {name}")


def guard_fp8_scales_on_load(layer: nn.Module, names: Sequence[str]) -> None:
    """Check the named scales in every ``load_state_dict`` that reaches ``layer`` (the module itself
    or any parent), BEFORE anything is copied, so a rejected state dict leaves the layer unchanged."""

    layer.register_load_state_dict_pre_hook(_ScaleLoadGuard(tuple(names)))


class _ScaleLoadGuard:
    """The ``load_state_dict`` pre-hook of ``guard_fp8_scales_on_load`` (a class: picklable, deep-copyable)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names

    def __call__(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        incoming = {n: state_dict[prefix + n] for n in self.names if prefix + n in state_dict}
        check_fp8_scales(module, list(incoming), incoming)


def shard(full: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous equal slice of ``full`` along ``dim``."""
    size = full.shape[dim]
    if size % world:
        raise ValueError(f"cannot shard dimension {dim} of size {size} over {world} ranks")
    return full.narrow(dim, rank * (size // world), size // world).contiguous()
