"""The input embedding -> ``VocabParallelEmbedding`` (Gemma's scaled one -> ``TransformersScaledEmbedding``)."""

from __future__ import annotations

import torch
from torch import nn

from layerpass.layers import VocabParallelEmbedding

from .conversion import Conversion
from .layers import TransformersScaledEmbedding
from .loading import load_vocab
from .probes import is_scaled_embedding


def convert_embedding(conv: Conversion, module: nn.Module,
                      path: str) -> tuple[nn.Module | None, VocabParallelEmbedding | None]:
    """``(replacement, its vocabulary-parallel table)``; ``(None, None)`` keeps the HF module, when
    it does more than a lookup (times Gemma's ``embed_scale``, which a probe checks)."""
    if not isinstance(module, nn.Embedding) or module.max_norm is not None:
        conv.convert_children(module, path)
        return None, None
    scale = getattr(module, "embed_scale", None)
    if type(module) is not nn.Embedding:
        if scale is None:
            return None, None
        scale = scale if isinstance(scale, torch.Tensor) else torch.tensor(float(scale))
        if not conv.probes.run("scaled_embedding", module, lambda: is_scaled_embedding(module, scale)):
            return None, None
    emb = VocabParallelEmbedding(module.num_embeddings, module.embedding_dim, params_dtype=conv.dtype, prefix=path)
    load_vocab(emb, module.weight)
    return (emb if type(module) is nn.Embedding else TransformersScaledEmbedding(emb, scale)), emb
