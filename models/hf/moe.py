"""MoE for converted Hugging Face models: ``TransformersFusedMoE`` and the block around it.

HF keeps a sparse block's experts as 3-D tensors (``gate_up_proj [E, 2I, H]``, gate rows then up
rows, and ``down_proj [E, H, I]``): exactly ``FusedMoE``'s ``w13_weight`` / ``w2_weight``
layout, so ``TransformersFusedMoE`` is a ``FusedMoE`` built from those tensors instead of seeded
random ones. It is an in-tree ``PluggableLayer`` of its own (``"transformers_fused_moe"``): a back
end can replace it out of tree, and as a ``FusedMoE`` subclass the MoE LoRA wrappers accept it.

``TransformersSparseMoeBlock`` replaces the HF block (router + experts [+ gated shared expert]):
the decoder layer calls it with ``[batch, seq, hidden]``; it flattens the tokens, computes the
router logits with a replicated linear and hands both to the experts (``convert_moe.py`` builds it).
"""

from __future__ import annotations

import torch
from torch import nn

from layerpass.layers import FusedMoE, PluggableLayer, ReplicatedLinear
from layerpass.layers.distributed import divide, get_tp_rank, get_tp_world_size, tensor_model_parallel_all_reduce
from layerpass.layers.weights import shard
from layerpass.ops import encode_layer_name


@PluggableLayer.register("transformers_fused_moe")
class TransformersFusedMoE(FusedMoE):
    """Routed SiLU-gated experts with the given (full, unsharded) HF expert weights.

    ``forward(hidden [T, H], router_logits [T, E]) -> [T, H]`` calls ``moe_forward`` with this
    layer's name and adds ``shared_experts(hidden)`` as a separate module call, so the compile
    backend's MoE fusion folds the two into ``moe_forward_shared``. ``shared_op=True`` calls
    ``moe_forward_shared`` directly instead (same numbers, nothing left to fuse)."""

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, top_k: int, renormalize: bool,
                 prefix: str = "", shared_experts: nn.Module | None = None, reduce_results: bool = True,
                 params_dtype: torch.dtype | None = None, shared_op: bool = False) -> None:
        # FusedMoE.__init__ would draw a full random copy of every expert first; set its
        # attributes (the ones the op and the LoRA wrappers read) from the HF tensors instead.
        PluggableLayer.__init__(self, prefix)
        if gate_up_proj.dim() != 3 or down_proj.dim() != 3:
            raise ValueError(f"TransformersFusedMoE {prefix!r}: expert weights must be 3-D (gate_up_proj [E, 2I, H], "
                             f"down_proj [E, H, I]), got {tuple(gate_up_proj.shape)} and {tuple(down_proj.shape)}")
        num_experts, two_i, hidden = gate_up_proj.shape
        inter = two_i // 2
        if two_i % 2 or tuple(down_proj.shape) != (num_experts, hidden, inter):
            raise ValueError(f"TransformersFusedMoE {prefix!r}: down_proj must be [E, H, I] = {(num_experts, hidden, inter)} "
                             f"to match gate_up_proj {tuple(gate_up_proj.shape)}, got {tuple(down_proj.shape)}")
        if not 0 < top_k <= num_experts:
            raise ValueError(f"TransformersFusedMoE {prefix!r}: need 0 < top_k <= num_experts ({num_experts}), got {top_k}")
        self.tp_size, self.tp_rank = get_tp_world_size(), get_tp_rank()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, bool(renormalize)
        self.hidden_size, self.intermediate_size = hidden, inter
        self.intermediate_size_per_partition = divide(inter, self.tp_size, f"TransformersFusedMoE {prefix!r} intermediate size")
        self.reduce_results = reduce_results
        self.shared_op = shared_op
        dtype = params_dtype or gate_up_proj.dtype
        w = gate_up_proj.detach()
        gate, up = w[:, :inter], w[:, inter:]
        w13 = torch.cat([shard(gate, 1, self.tp_rank, self.tp_size), shard(up, 1, self.tp_rank, self.tp_size)], dim=1)
        self.w13_weight = nn.Parameter(w13.to(dtype), requires_grad=False)
        self.w2_weight = nn.Parameter(shard(down_proj.detach(), 2, self.tp_rank, self.tp_size).to(dtype), requires_grad=False)
        self.shared_experts = shared_experts
        if shared_op and shared_experts is None:
            raise ValueError(f"TransformersFusedMoE {prefix!r}: shared_op=True needs shared_experts")

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        name = encode_layer_name(self.prefix)
        if self.shared_op:
            routed, shared = torch.ops.layerpass.moe_forward_shared(hidden_states, router_logits, name)
            out = routed + shared
        else:
            out = torch.ops.layerpass.moe_forward(hidden_states, router_logits, name)
            if self.shared_experts is not None:
                out = out + self.shared_experts(hidden_states)
        if self.reduce_results:
            out = tensor_model_parallel_all_reduce(out)
        return out


class TransformersSharedExpert(nn.Module):
    """A shared-expert MLP, optionally scaled by ``sigmoid(shared_expert_gate(x))`` (Qwen2-MoE).

    The MLP does not all-reduce: the experts add this partial sum and reduce once; the gate is
    replicated, so scaling a partial sum by it commutes with the reduction."""

    def __init__(self, mlp: nn.Module, gate: ReplicatedLinear | None) -> None:
        super().__init__()
        self.mlp = mlp
        self.shared_expert_gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared_expert_gate is None:
            return self.mlp(x)
        return torch.sigmoid(self.shared_expert_gate(x)) * self.mlp(x)


class TransformersSparseMoeBlock(nn.Module):
    """``forward(hidden [..., H]) -> [..., H]``: router logits, then the experts on the flattened tokens."""

    def __init__(self, gate: ReplicatedLinear, experts: FusedMoE) -> None:
        super().__init__()
        self.gate = gate
        self.experts = experts

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        return self.experts(x, self.gate(x)).view(hidden_states.shape)
