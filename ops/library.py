"""The one helper every layerpass op registers through (``torch.library``, namespace ``layerpass``).

``@layerpass_op("name", mutates_args=..., fake=...)`` on a plain-torch function gives:
the schema inferred from its annotations (so a ``LayerNameType`` argument becomes the
hoisted opaque type or ``str``), the function as the CPU (and fallback) kernel, the fake
(meta) implementation, optional tags, and a CUDA slot that ``register_cuda_kernel``
fills (the Triton kernels do, when triton is importable).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

NAMESPACE = "layerpass"
OPS: dict[str, Any] = {}  # op name -> torch.library.CustomOpDef


def layerpass_op(
    name: str,
    *,
    mutates_args: Iterable[str] = (),
    fake: Callable[..., Any] | None = None,
    tags: Iterable[torch.Tag] = (),
) -> Callable[[Callable[..., Any]], Any]:
    """Register ``fn`` as ``torch.ops.layerpass.<name>`` with ``fake`` as its fake impl."""

    def decorate(fn: Callable[..., Any]) -> Any:
        if name in OPS:
            raise ValueError(f"op layerpass::{name} is already registered")
        kwargs: dict[str, Any] = {"mutates_args": tuple(mutates_args)}
        tag_tuple = tuple(tags)
        if tag_tuple:
            kwargs["tags"] = tag_tuple
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", **kwargs)(fn)
        if fake is not None:
            op.register_fake(fake)
        OPS[name] = op
        return op

    return decorate


def register_cuda_kernel(name: str, kernel: Callable[..., Any]) -> None:
    """Serve ``layerpass::<name>`` on CUDA tensors with ``kernel`` (same signature as the op)."""
    if name not in OPS:
        raise KeyError(f"unknown layerpass op {name!r}; registered ops: {sorted(OPS)}")
    OPS[name].register_kernel("cuda")(kernel)


def op_overload(name: str) -> torch._ops.OpOverload:
    """``torch.ops.layerpass.<name>.default``: what appears as a node target in graphs."""
    return getattr(torch.ops.layerpass, name).default
