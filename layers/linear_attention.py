"""Bailing-MoE-linear style linear attention: ``BailingMoELinearAttention`` and ``BailingRMSNormGated``.

The attention layer is a ``PluggableLayer`` (``"bailing_moe_linear_attention"``), so an
out-of-tree back end replaces the whole class by registering a subclass. It owns, as PLAIN
attributes (never parameters or buffers: only the op reads and writes them, the traced
forward never touches them):

- ``state_cache [num_state_slots, heads_per_rank, head_size, head_size]``: one recurrent state
  per sequence, indexed by ``BatchMetadata.state_indices`` (dtype configurable, float32 allowed);
- ``slopes [heads_per_rank]``: per-head decay rates (``lambda = exp(-slope)``).

Forward: ``query_key_value`` -> optional per-head RMS norm of q and k -> rotary (in the model
dtype: nothing is forced to float32) -> ``layerpass::linear_attention`` -> gated group RMS norm
(``g_proj`` gives the gate) -> ``dense``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from layerpass.ops import encode_layer_name
from layerpass.ops.linear_attention import linear_attention as linear_attention_op

from .distributed import divide, get_tp_rank, get_tp_world_size
from .layernorm import RMSNorm
from .linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from .linear_methods import Fp8Config
from .pluggable import PluggableLayer
from .rotary_embedding import RotaryEmbedding
from .weights import init_normal


def _alibi_like(n: int) -> list[float]:
    """Geometric slopes ``2^(-8/n * (i+1))``; for n not a power of two, the closest power's slopes
    plus every other slope of twice that power (so the rates still spread over octaves)."""
    if n & (n - 1) == 0:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]
    closest = 2 ** math.floor(math.log2(n))
    return _alibi_like(closest) + _alibi_like(2 * closest)[0::2][: n - closest]


def linear_attention_slopes(num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """float32 ``[num_heads]`` decay slopes of layer ``layer_idx``: deeper layers decay slower
    (the last keeps a near-lossless memory), as in lightning-attention hybrids."""
    if num_heads <= 0 or num_layers <= 0 or not 0 <= layer_idx < num_layers:
        raise ValueError(
            f"linear_attention_slopes needs num_heads > 0 and 0 <= layer_idx < num_layers, got "
            f"num_heads={num_heads}, layer_idx={layer_idx}, num_layers={num_layers}"
        )
    depth = 1.0 - layer_idx / (num_layers - 1) + 1e-5 if num_layers > 1 else 1.0
    return torch.tensor(_alibi_like(num_heads), dtype=torch.float32) * depth


@PluggableLayer.register("bailing_rms_norm_gated")
class BailingRMSNormGated(PluggableLayer):
    """``forward(x, gate) = rms_norm_per_group(x) * weight * sigmoid(gate)``.

    ``x`` is normalised over contiguous groups of ``group_size`` channels (default: all of them);
    the groups lie within one rank's heads, so tensor parallelism needs no communication."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, group_size: int | None = None,
                 params_dtype: torch.dtype | None = None, prefix: str = "") -> None:
        super().__init__(prefix)
        group_size = hidden_size if group_size is None else group_size
        if hidden_size <= 0 or group_size <= 0 or hidden_size % group_size or not eps > 0:
            raise ValueError(
                f"BailingRMSNormGated {prefix!r}: need hidden_size > 0 divisible by group_size > 0 and eps > 0, "
                f"got hidden_size={hidden_size}, group_size={group_size}, eps={eps}"
            )
        self.hidden_size, self.group_size, self.variance_epsilon = hidden_size, group_size, eps
        weight = init_normal(prefix, "weight", (hidden_size,), std=0.05, mean=1.0)
        self.weight = nn.Parameter(weight.to(params_dtype or torch.get_default_dtype()), requires_grad=False)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if x.shape != gate.shape or x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"BailingRMSNormGated {self.prefix!r}: x and gate must both be [..., {self.hidden_size}], "
                f"got {tuple(x.shape)} and {tuple(gate.shape)}"
            )
        xf = x.float().unflatten(-1, (-1, self.group_size))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        out = xf.flatten(-2) * self.weight.float() * torch.sigmoid(gate.float())
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}, group_size={self.group_size}, eps={self.variance_epsilon}"


@PluggableLayer.register("bailing_moe_linear_attention")
class BailingMoELinearAttention(PluggableLayer):
    """``forward(positions [T], hidden [T, hidden_size]) -> [T, hidden_size]`` (multi-head, no GQA)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_size: int,
        *,
        layer_idx: int,
        num_layers: int,
        num_state_slots: int,
        state_dtype: torch.dtype | None = None,
        block_size: int = 64,
        use_qk_norm: bool = True,
        norm_groups: int = 1,
        rms_norm_eps: float = 1e-6,
        rotary_dim: int | None = None,
        max_position: int = 4096,
        rope_theta: float = 10000.0,
        is_neox_style: bool = True,
        quant_config: Fp8Config | None = None,
        params_dtype: torch.dtype | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__(prefix)
        dtype = params_dtype or torch.get_default_dtype()
        state_dtype = dtype if state_dtype is None else state_dtype
        if not (isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point):
            raise ValueError(f"BailingMoELinearAttention {prefix!r}: state_dtype must be a float dtype, got {state_dtype!r}")
        if num_state_slots <= 0 or block_size <= 0 or norm_groups <= 0 or num_heads % norm_groups:
            raise ValueError(
                f"BailingMoELinearAttention {prefix!r}: need num_state_slots > 0, block_size > 0 and num_heads "
                f"divisible by norm_groups; got {num_state_slots}, {block_size}, num_heads={num_heads}, "
                f"norm_groups={norm_groups}"
            )
        tp, rank = get_tp_world_size(), get_tp_rank()
        heads = divide(num_heads, tp, f"BailingMoELinearAttention {prefix!r} number of heads")
        heads_per_group = num_heads // norm_groups
        if heads % heads_per_group:
            raise ValueError(
                f"BailingMoELinearAttention {prefix!r}: a norm group ({heads_per_group} heads) would straddle "
                f"tensor-parallel ranks ({heads} heads each); choose norm_groups divisible by the TP size"
            )
        self.hidden_size, self.total_num_heads, self.num_heads, self.head_size = hidden_size, num_heads, heads, head_size
        self.layer_idx, self.block_size, self.use_qk_norm = layer_idx, block_size, use_qk_norm
        self.scaling = head_size ** -0.5
        inner = num_heads * head_size
        self.query_key_value = QKVParallelLinear(hidden_size, head_size, num_heads, num_heads, bias=False,
                                                 quant_config=quant_config, prefix=f"{prefix}.query_key_value",
                                                 params_dtype=dtype)
        self.q_size = self.query_key_value.q_size
        if use_qk_norm:
            self.query_layernorm = RMSNorm(head_size, rms_norm_eps, dtype, prefix=f"{prefix}.query_layernorm")
            self.key_layernorm = RMSNorm(head_size, rms_norm_eps, dtype, prefix=f"{prefix}.key_layernorm")
        self.rotary_emb = RotaryEmbedding(head_size, rotary_dim, max_position=max_position, base=rope_theta,
                                          is_neox_style=is_neox_style, prefix=f"{prefix}.rotary_emb")
        self.g_proj = ColumnParallelLinear(hidden_size, inner, bias=False, quant_config=quant_config,
                                           prefix=f"{prefix}.g_proj", params_dtype=dtype)
        self.g_norm = BailingRMSNormGated(heads * head_size, rms_norm_eps, heads_per_group * head_size,
                                          params_dtype=dtype, prefix=f"{prefix}.g_norm")
        self.dense = RowParallelLinear(inner, hidden_size, bias=False, quant_config=quant_config,
                                       prefix=f"{prefix}.dense", params_dtype=dtype)
        full = linear_attention_slopes(num_heads, layer_idx, num_layers)
        self.slopes = full[rank * heads : (rank + 1) * heads].clone()
        self.state_cache = torch.zeros(num_state_slots, heads, head_size, head_size, dtype=state_dtype)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        t = hidden_states.shape[0]
        h, d = self.num_heads, self.head_size
        qkv = self.query_key_value(hidden_states)
        q, k, v = qkv.split([self.q_size] * 3, dim=-1)
        if self.use_qk_norm:
            q = self.query_layernorm(q.reshape(t, h, d)).reshape(t, h * d)
            k = self.key_layernorm(k.reshape(t, h, d)).reshape(t, h * d)
        q, k = self.rotary_emb(positions, q, k)
        q3 = (q * self.scaling).view(t, h, d)
        k3 = k.reshape(t, h, d)
        v3 = v.reshape(t, h, d)
        output = v3.new_empty(v3.shape)  # contiguous (v3 is a strided view of qkv)
        linear_attention_op(q3, k3, v3, output, encode_layer_name(self.prefix))
        gated = self.g_norm(output.view(t, h * d), self.g_proj(hidden_states))
        return self.dense(gated)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}/{self.total_num_heads}, head_size={self.head_size}, "
                f"state={tuple(self.state_cache.shape)} {self.state_cache.dtype}, block_size={self.block_size}")
