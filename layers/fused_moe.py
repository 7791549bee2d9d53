"""``FusedMoE``: routed SiLU-gated experts over ``moe_forward``, plus optional shared experts.

Tensor parallelism shards every expert's intermediate dimension: ``w13_weight`` holds this
rank's gate rows then its up rows, ``w2_weight`` the matching input columns, so each rank
produces a partial sum. The shared experts are built with ``reduce_results=False`` and their
partial output is added BEFORE the single all-reduce of the block.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from layerpass.ops import FP8_DTYPE, FP8_MAX, encode_layer_name
from layerpass.ops.moe import moe_forward
from layerpass.ops.moe_quant import moe_forward_fp8
from layerpass.ops.quant import quantize_fp8, static_scaled_fp8_quant

from .distributed import divide, get_tp_rank, get_tp_world_size, tensor_model_parallel_all_reduce
from .linear_methods import Fp8Config
from .pluggable import PluggableLayer
from .weights import check_fp8_scales, guard_fp8_scales_on_load, init_normal, shard


FP8_MOE_SCALES = ("w13_scale", "w2_scale", "input_scale")


@PluggableLayer.register("fused_moe")
class FusedMoE(PluggableLayer):
    """``forward(hidden [T, H], router_logits [T, E]) -> [T, H]``."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool = True,
                 prefix: str = "", shared_experts: nn.Module | None = None, reduce_results: bool = True,
                 params_dtype: torch.dtype | None = None, quant_config: "Fp8Config | None" = None) -> None:
        super().__init__(prefix)
        if not 0 < top_k <= num_experts or hidden_size <= 0 or intermediate_size <= 0:
            raise ValueError(f"FusedMoE {prefix!r}: need 0 < top_k <= num_experts and positive sizes, got top_k={top_k}, "
                             f"num_experts={num_experts}, hidden={hidden_size}, intermediate={intermediate_size}")
        self.tp_size, self.tp_rank = get_tp_world_size(), get_tp_rank()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.intermediate_size_per_partition = divide(intermediate_size, self.tp_size, f"FusedMoE {prefix!r} intermediate size")
        self.reduce_results = reduce_results
        dtype = params_dtype or torch.get_default_dtype()
        gate = init_normal(prefix, "w1", (num_experts, intermediate_size, hidden_size), std=hidden_size ** -0.5)
        up = init_normal(prefix, "w3", (num_experts, intermediate_size, hidden_size), std=hidden_size ** -0.5)
        down = init_normal(prefix, "w2", (num_experts, hidden_size, intermediate_size), std=1 / math.sqrt(intermediate_size))
        w13 = torch.cat([shard(gate, 1, self.tp_rank, self.tp_size), shard(up, 1, self.tp_rank, self.tp_size)], dim=1)
        w2 = shard(down, 2, self.tp_rank, self.tp_size)
        self.quant_config = quant_config
        if quant_config is None:
            self.w13_weight = nn.Parameter(w13.to(dtype), requires_grad=False)
            self.w2_weight = nn.Parameter(w2.to(dtype), requires_grad=False)
        else:
            # static per-tensor FP8: scales from the FULL (unsharded) weights, so every rank agrees
            w13_scale = torch.tensor([max(float(torch.cat([gate, up]).abs().max()), 1e-12) / FP8_MAX])
            w2_scale = torch.tensor([max(float(down.abs().max()), 1e-12) / FP8_MAX])
            self.w13_weight = nn.Parameter(quantize_fp8(w13, w13_scale), requires_grad=False)
            self.w2_weight = nn.Parameter(quantize_fp8(w2, w2_scale), requires_grad=False)
            self.w13_scale = nn.Parameter(w13_scale, requires_grad=False)
            self.w2_scale = nn.Parameter(w2_scale, requires_grad=False)
            self.input_scale = nn.Parameter(torch.tensor([quant_config.activation_absmax / FP8_MAX]), requires_grad=False)
            check_fp8_scales(self, FP8_MOE_SCALES)  # NaN / inf weights give NaN / inf scales
            guard_fp8_scales_on_load(self, FP8_MOE_SCALES)
        self.shared_experts = shared_experts

    def routed(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """The routed experts; under FP8 the input is quantised by a separate op (a fusion target)."""
        name = encode_layer_name(self.prefix)
        if self.quant_config is None:
            return moe_forward(hidden_states, router_logits, name)
        q = torch.empty(hidden_states.shape, dtype=FP8_DTYPE, device=hidden_states.device)
        static_scaled_fp8_quant(q, hidden_states, self.input_scale)
        return moe_forward_fp8(q, self.input_scale, router_logits, name, hidden_states.dtype)

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        out = self.routed(hidden_states, router_logits)
        if self.shared_experts is not None:
            # A separate module call, so a fusion pass can fold it into moe_forward_shared.
            out = out + self.shared_experts(hidden_states)
        if self.reduce_results:
            out = tensor_model_parallel_all_reduce(out)
        return out

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, top_k={self.top_k}, hidden={self.hidden_size}, "
                f"intermediate={self.intermediate_size_per_partition}/{self.intermediate_size}, renormalize={self.renormalize}")
