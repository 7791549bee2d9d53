"""Small modules a converted Hugging Face model is assembled with: the LM head that hands HF's
own ``*ForCausalLM.forward`` the full-vocabulary logits, and the scaled input embedding."""

from __future__ import annotations

import torch
from torch import nn

from layerpass.layers import LogitsProcessor, ParallelLMHead, VocabParallelEmbedding


class TransformersLMHead(nn.Module):
    """Stands in for the HF ``lm_head`` linear: ``hidden [..., H] -> logits [..., vocab]``, this
    rank's vocabulary shard from ``ParallelLMHead``, gathered and unpadded by ``LogitsProcessor``.
    The HF ``*ForCausalLM.forward`` around it then post-processes them as the family does (Gemma's
    final soft-capping, Granite's ``logits_scaling``)."""

    def __init__(self, lm_head: ParallelLMHead, logits_processor: LogitsProcessor) -> None:
        super().__init__()
        self.lm_head = lm_head
        self.logits_processor = logits_processor

    @property
    def weight(self) -> nn.Parameter:
        return self.lm_head.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)


class TransformersScaledEmbedding(nn.Module):
    """``embedding(ids) * embed_scale`` (Gemma's scaled word embedding) on a ``VocabParallelEmbedding``;
    the scale is the HF module's own ``embed_scale`` tensor, cast like HF casts it."""

    def __init__(self, embedding: VocabParallelEmbedding, embed_scale: torch.Tensor) -> None:
        super().__init__()
        self.embedding = embedding
        self.register_buffer("embed_scale", embed_scale.detach().clone(), persistent=False)

    @property
    def weight(self) -> nn.Parameter:
        return self.embedding.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids) * self.embed_scale.to(self.embedding.weight.dtype)
