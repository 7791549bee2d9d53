"""``LogitsProcessor``: LM head product, gather of the vocabulary shards, padding removal."""

from __future__ import annotations

import torch

from .distributed import tensor_model_parallel_all_gather
from .pluggable import PluggableLayer
from .vocab_parallel_embedding import ParallelLMHead


@PluggableLayer.register("logits_processor")
class LogitsProcessor(PluggableLayer):
    """``forward(lm_head, hidden [T, H]) -> logits [T, vocab_size]`` (times ``scale``)."""

    def __init__(self, vocab_size: int, org_vocab_size: int | None = None, scale: float = 1.0, prefix: str = "logits_processor") -> None:
        super().__init__(prefix)
        self.vocab_size = vocab_size
        self.org_vocab_size = org_vocab_size if org_vocab_size is not None else vocab_size
        self.scale = scale

    def forward(self, lm_head: ParallelLMHead, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = tensor_model_parallel_all_gather(lm_head(hidden_states), dim=-1)
        logits = logits[..., : self.org_vocab_size]  # drop the vocabulary padding
        if self.scale != 1.0:
            logits = logits * self.scale
        return logits
