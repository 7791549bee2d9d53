"""The per-step forward context: the batch metadata and layer registry every op of the step reads."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

from .batch_metadata import BatchMetadata
from .registry_check import check_metadata_for_registry
from .state import LayerRegistry


@dataclass
class ForwardContext:
    metadata: BatchMetadata | None
    registry: LayerRegistry | None


_forward_context: contextvars.ContextVar[ForwardContext | None] = contextvars.ContextVar(
    "layerpass_forward_context", default=None
)


@contextlib.contextmanager
def set_forward_context(
    metadata: BatchMetadata | None, registry: LayerRegistry | None = None
) -> Iterator[ForwardContext]:
    """Make ``metadata`` (and the model's layer ``registry``) visible to the ops of one step.

    With both given, the metadata is checked against the registry's KV and state caches here, once
    per step and outside the compiled code (slots, block ids, block size, state slots in range), so
    a bad batch is a ``ValueError`` naming the layer and the field instead of an ``IndexError``
    inside an op. The check reads the metadata's host values (``BatchMetadata.host``), never its
    tensors: no device sync per step."""
    if metadata is not None and registry is not None:
        check_metadata_for_registry(metadata, registry)
    ctx = ForwardContext(metadata, registry)
    token = _forward_context.set(ctx)
    try:
        yield ctx
    finally:
        _forward_context.reset(token)


def current_forward_context() -> ForwardContext | None:
    return _forward_context.get()


def get_batch_metadata() -> BatchMetadata:
    """The step's batch metadata; raises if an op runs outside ``set_forward_context``."""
    ctx = _forward_context.get()
    if ctx is None or ctx.metadata is None:
        raise RuntimeError(
            "no batch metadata: run the model inside `with set_forward_context(metadata, registry):` "
            "(or use models.make_step(...).run(fn))"
        )
    return ctx.metadata
