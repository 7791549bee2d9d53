"""Copy Hugging Face weights into layerpass layers, exactly, sharded like the layer itself.

Each layerpass layer is built first (it draws throw-away seeded weights and registers its
prefix), then receives the HF tensors here. The shard of a FULL tensor is cut the same way the
layer cuts its own weights (``layers/linear.py``): column-parallel layers shard every packed
slice along the output dim, row-parallel ones the input dim, so any tensor-parallel world size
loads the same model. Linear weights go through the layer's ``quant_method.create_weights``,
so an ``Fp8Config`` layer quantises the HF weight like one of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from layerpass.layers import (
    ColumnParallelLinear,
    LinearBase,
    ReplicatedLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from layerpass.layers.weights import shard


def _check_shape(what: str, got: torch.Size, want: tuple[int, ...]) -> None:
    if tuple(got) != tuple(want):
        raise ValueError(f"{what}: Hugging Face tensor has shape {tuple(got)}, the layerpass layer expects {tuple(want)}")


def load_linear(layer: LinearBase, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None] | None = None) -> None:
    """Give ``layer`` the FULL per-slice weights ``[out_i, in]`` (and biases ``[out_i]``) of its packed slices."""
    if len(weights) != len(layer.output_sizes):
        raise ValueError(f"{layer.prefix}: {len(weights)} weight slices for a layer packing {len(layer.output_sizes)}")
    for i, (w, n) in enumerate(zip(weights, layer.output_sizes)):
        _check_shape(f"{layer.prefix} weight slice {i}", w.shape, (n, layer.input_size))
    full = [w.detach().float() for w in weights]
    absmax = max(float(w.abs().max()) for w in full)
    if isinstance(layer, RowParallelLinear):
        local = shard(torch.cat(full), 1, layer.tp_rank, layer.tp_size)
    elif isinstance(layer, ColumnParallelLinear):
        local = torch.cat([shard(w, 0, layer.tp_rank, layer.tp_size) for w in full])
    elif isinstance(layer, ReplicatedLinear):
        local = torch.cat(full)
    else:
        raise TypeError(f"{layer.prefix}: cannot load a {type(layer).__name__}; allowed: column/row-parallel or replicated linears")
    # Replace the throw-away parameters with the HF ones (fp8 methods quantise here).
    layer.quant_method.create_weights(layer, local.contiguous(), absmax, layer.params_dtype)
    given = [b for b in (biases or []) if b is not None]
    if layer.bias is None:
        if given:
            raise ValueError(f"{layer.prefix}: the Hugging Face module has a bias, the layerpass layer was built without one")
        return
    if len(given) != len(layer.output_sizes):
        raise ValueError(f"{layer.prefix}: the layerpass layer has a bias but the Hugging Face module has none for every slice")
    full_b = [b.detach().float() for b in given]
    if isinstance(layer, ColumnParallelLinear):
        local_b = torch.cat([shard(b, 0, layer.tp_rank, layer.tp_size) for b in full_b])
    else:  # row-parallel adds its full bias once after the reduction; replicated holds it whole
        local_b = torch.cat(full_b)
    layer.bias = nn.Parameter(local_b.to(layer.params_dtype), requires_grad=False)


def _vocab_shard(layer: VocabParallelEmbedding, rows: torch.Tensor) -> torch.Tensor:
    full = torch.zeros(layer.num_embeddings_padded, *rows.shape[1:])
    full[: layer.org_vocab_size] = rows.detach().float()
    return full[layer.vocab_start_index : layer.vocab_end_index].contiguous()


def load_vocab(layer: VocabParallelEmbedding, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Rows ``[vocab, dim]`` (and an LM-head bias ``[vocab]``) into the padded, vocabulary-sharded
    table; padding rows stay zero."""
    _check_shape(f"{layer.prefix} weight", weight.shape, (layer.org_vocab_size, layer.embedding_dim))
    dtype = layer.weight.dtype
    layer.weight = nn.Parameter(_vocab_shard(layer, weight).to(dtype), requires_grad=False)
    has_bias = getattr(layer, "bias", None) is not None
    if (bias is not None) != has_bias:
        raise ValueError(f"{layer.prefix}: bias mismatch (Hugging Face: {bias is not None}, layerpass layer: {has_bias})")
    if bias is not None:
        _check_shape(f"{layer.prefix} bias", bias.shape, (layer.org_vocab_size,))
        layer.bias = nn.Parameter(_vocab_shard(layer, bias).to(dtype), requires_grad=False)


def copy_param(what: str, param: nn.Parameter, value: torch.Tensor) -> None:
    """Overwrite a replicated parameter (norm weight) with the HF tensor of the same shape."""
    _check_shape(what, value.shape, tuple(param.shape))
    with torch.no_grad():
        param.copy_(value.detach())
