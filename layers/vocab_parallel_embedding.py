"""Vocabulary-parallel embedding and LM head.

The vocabulary is padded to a multiple of ``padding_size * tp_size`` (padding rows are zero)
and split into equal contiguous shards. ``VocabParallelEmbedding`` looks up the ids of its
shard, zeroes the rows of ids outside it, and all-reduces, so each id gets exactly one
rank's row. ``ParallelLMHead`` holds the same kind of shard and produces this rank's slice of
the logits; ``LogitsProcessor`` gathers them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import get_tp_rank, get_tp_world_size, tensor_model_parallel_all_reduce
from .pluggable import PluggableLayer
from .weights import init_normal

DEFAULT_VOCAB_PADDING_SIZE = 64


def pad_vocab_size(vocab_size: int, pad_to: int) -> int:
    return -(-vocab_size // pad_to) * pad_to


@PluggableLayer.register("vocab_parallel_embedding")
class VocabParallelEmbedding(PluggableLayer):
    """``weight [padded_vocab / tp, embedding_dim]``; ids outside this rank's shard are masked."""

    init_std = 1.0

    def __init__(self, num_embeddings: int, embedding_dim: int, params_dtype: torch.dtype | None = None,
                 padding_size: int = DEFAULT_VOCAB_PADDING_SIZE, prefix: str = "") -> None:
        super().__init__(prefix)
        if num_embeddings <= 0 or embedding_dim <= 0 or padding_size <= 0:
            raise ValueError(f"{type(self).__name__} {prefix!r}: num_embeddings, embedding_dim and padding_size must be "
                             f"positive, got {num_embeddings}, {embedding_dim}, {padding_size}")
        self.tp_size, self.tp_rank = get_tp_world_size(), get_tp_rank()
        self.org_vocab_size = num_embeddings
        self.embedding_dim = embedding_dim
        self.num_embeddings_padded = pad_vocab_size(num_embeddings, padding_size * self.tp_size)
        self.num_embeddings_per_partition = self.num_embeddings_padded // self.tp_size
        self.vocab_start_index = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        full = torch.zeros(self.num_embeddings_padded, embedding_dim)
        full[:num_embeddings] = init_normal(prefix, "weight", (num_embeddings, embedding_dim), std=self._std())
        local = full[self.vocab_start_index : self.vocab_end_index].contiguous()
        self.weight = nn.Parameter(local.to(params_dtype or torch.get_default_dtype()), requires_grad=False)

    def _std(self) -> float:
        return self.init_std

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_shard = (input_ids >= self.vocab_start_index) & (input_ids < self.vocab_end_index)
        local_ids = torch.where(in_shard, input_ids - self.vocab_start_index, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(~in_shard.unsqueeze(-1), 0)
        return tensor_model_parallel_all_reduce(out)

    def extra_repr(self) -> str:
        return (f"vocab={self.org_vocab_size} (padded {self.num_embeddings_padded}), dim={self.embedding_dim}, "
                f"shard=[{self.vocab_start_index}, {self.vocab_end_index})")


@PluggableLayer.register("parallel_lm_head")
class ParallelLMHead(VocabParallelEmbedding):
    """Output projection sharded by vocabulary; ``forward(hidden)`` gives this rank's logits slice."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False, params_dtype: torch.dtype | None = None,
                 padding_size: int = DEFAULT_VOCAB_PADDING_SIZE, prefix: str = "") -> None:
        super().__init__(num_embeddings, embedding_dim, params_dtype=params_dtype, padding_size=padding_size, prefix=prefix)
        if bias:
            full = torch.zeros(self.num_embeddings_padded)
            full[:num_embeddings] = init_normal(prefix, "bias", (num_embeddings,), std=0.02)
            self.bias = nn.Parameter(full[self.vocab_start_index : self.vocab_end_index].to(self.weight.dtype), requires_grad=False)
        else:
            self.bias = None

    def _std(self) -> float:
        return self.embedding_dim ** -0.5

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states, self.weight, self.bias)
