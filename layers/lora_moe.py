"""LoRA wrappers of ``FusedMoE``: per-expert adapters on the gate/up and down projections.

- ``FusedMoEWithLoRA`` (two packed modules: separate gate ``w1`` and up ``w3`` adapters);
- ``FusedMoE3DWithLoRA`` (one packed module: a single ``w13`` adapter over the stacked gate|up).
Both also adapt the down projection ``w2``. Expert ``e`` computes
``W2 act(W13 x + s B13 A13 x) + s B2 A2 act(...)``; tensor parallelism shards the intermediate
dimension like the base (B13 rows, A2 columns), and the block all-reduces once at the end.

The routed experts run here in plain torch (the base op cannot take adapters); routing uses the
same softmax top-k as the op. ``can_replace_layer`` uses ``isinstance`` against
``maybe_get_oot_by_class(FusedMoE)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layerpass.ops.moe import select_experts

from .distributed import tensor_model_parallel_all_reduce
from .fused_moe import FusedMoE
from .lora_base import BaseLayerWithLoRA, LoRAConfig, LoRASlice
from .pluggable import maybe_get_oot_by_class


def _delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    return (x @ a.float().t()) @ b.float().t() * scaling


class FusedMoEWithLoRA(BaseLayerWithLoRA):
    packed_count = 2

    def _up_slices(self, r: int) -> list[LoRASlice]:
        m: FusedMoE = self.base_layer
        e, h, i = m.num_experts, m.hidden_size, m.intermediate_size
        return [LoRASlice("w1", (e, r, h), (e, i, r), None, (1, [i])), LoRASlice("w3", (e, r, h), (e, i, r), None, (1, [i]))]

    def slices(self, rank: int) -> list[LoRASlice]:
        m: FusedMoE = self.base_layer
        e, h, i = m.num_experts, m.hidden_size, m.intermediate_size
        return self._up_slices(rank) + [LoRASlice("w2", (e, rank, i), (e, h, rank), (2, [i]), None)]

    def _gate_up_delta(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """This rank's ``[gate_r | up_r]`` adapter contribution for expert ``e``."""
        (a1, b1), (a3, b3) = self.lora_pair("w1"), self.lora_pair("w3")
        return torch.cat([_delta(x, a1[e], b1[e], self.scaling), _delta(x, a3[e], b3[e], self.scaling)], dim=-1)

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        m: FusedMoE = self.base_layer
        weights, ids = select_experts(router_logits, m.top_k, m.renormalize)
        inter = m.intermediate_size_per_partition
        a2, b2 = self.lora_pair("w2")
        # Dense over experts (every expert sees every token, weighted by its routing weight, zero
        # when not routed): no data-dependent shapes, so it traces under torch.compile(fullgraph).
        combine = torch.zeros(router_logits.shape, dtype=torch.float32, device=hidden_states.device)
        combine.scatter_add_(1, ids, weights)
        x = hidden_states.float()
        out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
        for e in range(m.num_experts):
            h = x @ m.w13_weight[e].float().t() + self._gate_up_delta(x, e)
            act = F.silu(h[:, :inter]) * h[:, inter:]
            y = act @ m.w2_weight[e].float().t() + _delta(act, a2[e], b2[e], self.scaling)
            out = out + combine[:, e : e + 1] * y
        out = out.to(hidden_states.dtype)
        if m.shared_experts is not None:
            out = out + m.shared_experts(hidden_states)
        if m.reduce_results:
            out = tensor_model_parallel_all_reduce(out)
        return out

    @classmethod
    def can_replace_layer(cls, source_layer: nn.Module, lora_config: LoRAConfig, packed_modules_list: list[str],
                          model_config: Any = None) -> bool:
        return isinstance(source_layer, maybe_get_oot_by_class(FusedMoE)) and len(packed_modules_list) == cls.packed_count


class FusedMoE3DWithLoRA(FusedMoEWithLoRA):
    packed_count = 1

    def _up_slices(self, r: int) -> list[LoRASlice]:
        m: FusedMoE = self.base_layer
        e, h, i = m.num_experts, m.hidden_size, m.intermediate_size
        return [LoRASlice("w13", (e, r, h), (e, 2 * i, r), None, (1, [i, i]))]

    def _gate_up_delta(self, x: torch.Tensor, e: int) -> torch.Tensor:
        a, b = self.lora_pair("w13")
        return _delta(x, a[e], b[e], self.scaling)
