"""layerpass custom ops (``torch.ops.layerpass.*``), each with a CPU kernel in plain torch.

Layers call each op through its checked entry point (``ops.norm.rms_norm``, ``ops.quant.scaled_fp8_mm``,
``ops.attention.unified_attention_with_output``, ...): the checks run in eager and, through the
ops' fake kernels, once per compiled piece at trace time; the kernels themselves never check
(``ops/norm.py``'s docstring)."""

from . import attention, fused, linear_attention, moe, moe_quant, norm, quant, step_inputs  # noqa: F401  (registers the ops)
from .batch_builder import build_batch_metadata
from .batch_metadata import BatchMetadata, HostMetadata, host_values
from .forward_context import ForwardContext, current_forward_context, get_batch_metadata, set_forward_context
from .layer_lookup import lookup_layer
from .layer_name import LayerName, LayerNameType, encode_layer_name, resolve_layer_name
from .library import OPS, layerpass_op, op_overload, register_cuda_kernel
from .quant import FP8_DTYPE, FP8_MAX
from .state import (
    DEFAULT_REGISTRY,
    DuplicateLayerError,
    LayerNotFoundError,
    LayerRegistry,
    current_registry,
    layer_registry_scope,
)

__all__ = [
    "BatchMetadata", "ForwardContext", "HostMetadata", "build_batch_metadata", "current_forward_context",
    "get_batch_metadata", "host_values", "set_forward_context", "LayerName", "LayerNameType", "encode_layer_name",
    "resolve_layer_name", "OPS", "layerpass_op", "op_overload", "register_cuda_kernel", "FP8_DTYPE",
    "FP8_MAX", "DEFAULT_REGISTRY", "DuplicateLayerError", "LayerNotFoundError", "LayerRegistry",
    "current_registry", "layer_registry_scope", "lookup_layer",
]

# Serve the ops on CUDA with Triton kernels: a no-op without triton, and triton itself is
# imported only on an op's first CUDA call.
from .triton import register_triton_kernels as _register_triton_kernels  # noqa: E402

_register_triton_kernels()
