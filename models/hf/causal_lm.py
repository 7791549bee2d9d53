"""``TransformersForCausalLM``: a converted Hugging Face ``*ForCausalLM`` with the zoo models' call."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from layerpass.layers import LogitsProcessor, ParallelLMHead
from layerpass.ops.step_inputs import check_step_inputs, max_position


class TransformersForCausalLM(nn.Module):
    """``forward(input_ids [T], positions [T]) -> logits [T, vocab]``, like the zoo models.

    The step's tokens (all requests, decode-first) run as one sequence of batch 1 through the HF
    ``*ForCausalLM``'s own forward (``hf``), undecorated: its base model's forward is its own too,
    minus transformers' output-capturing wrappers (``capture_outputs`` reads a process-wide
    registry Dynamo would guard on, so every new HF class would invalidate compiled code).
    Attention separates the requests by the step's metadata; transformers builds no mask for it."""

    packed_modules_mapping: dict[str, list[str]] = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
        "experts": ["gate_proj", "up_proj"],  # FusedMoEWithLoRA: separate gate and up adapters
    }

    def __init__(self, hf_model: nn.Module, head_name: str, architecture: str) -> None:
        super().__init__()
        self.hf = hf_model
        self.hf_config = hf_model.config
        self.architecture = architecture
        self._head_name = head_name
        self._hf_forward = inspect.unwrap(type(hf_model).forward)

    @property
    def model(self) -> nn.Module:
        """The HF base model (``model.layers``, ``model.embed_tokens``, ...)."""
        return self.hf.base_model

    @property
    def lm_head(self) -> ParallelLMHead:
        return getattr(self.hf, self._head_name).lm_head

    @property
    def logits_processor(self) -> LogitsProcessor:
        return getattr(self.hf, self._head_name).logits_processor

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # checked on every path: here in eager; compiled, by the op whose output the model goes on
        # with, on the real tensors (ops/step_inputs.py)
        input_ids = check_step_inputs(input_ids, positions, max_position=max_position(self))
        out = self._hf_forward(self.hf, input_ids=input_ids.unsqueeze(0), position_ids=positions.unsqueeze(0),
                               use_cache=False)
        return out.logits[0]
