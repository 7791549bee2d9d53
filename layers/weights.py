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
from collections.abc import Iterator

import torch

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


def shard(full: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous equal slice of ``full`` along ``dim``."""
    size = full.shape[dim]
    if size % world:
        raise ValueError(f"cannot shard dimension {dim} of size {size} over {world} ranks")
    return full.narrow(dim, rank * (size // world), size // world).contiguous()
