"""Linear layers: replicated, column-parallel (plain, merged, QKV) and row-parallel.

Weights are ``[out, in]`` (``F.linear`` layout). Column-parallel layers shard the OUTPUT
dimension of each packed slice over the tensor-parallel ranks (each rank computes its part of
every slice: ``[q_r, k_r, v_r]`` for QKV); row-parallel layers shard the INPUT dimension and
sum the partial products with one all-reduce. Forward returns a tensor (no bias tuple).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .distributed import divide, get_tp_rank, get_tp_world_size, tensor_model_parallel_all_gather, tensor_model_parallel_all_reduce
from .linear_methods import Fp8Config, get_linear_method
from .pluggable import PluggableLayer
from .weights import init_normal, shard


class LinearBase(PluggableLayer):
    """Shared construction: draw the full weight per packed slice, shard it, hand it to the method."""

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        *,
        bias: bool,
        quant_config: Fp8Config | None,
        prefix: str,
        params_dtype: torch.dtype | None,
        shard_dim: int | None,
    ) -> None:
        super().__init__(prefix)
        if input_size <= 0 or not output_sizes or any(n <= 0 for n in output_sizes):
            raise ValueError(f"{type(self).__name__} {prefix!r}: sizes must be positive, got in={input_size}, out={output_sizes}")
        self.tp_size, self.tp_rank = get_tp_world_size(), get_tp_rank()
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        self.output_size = sum(output_sizes)
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.quant_method = get_linear_method(quant_config)
        slices = [init_normal(prefix, f"weight.{i}", (n, input_size), std=1.0 / math.sqrt(input_size)) for i, n in enumerate(output_sizes)]
        full_absmax = max(float(s.abs().max()) for s in slices)
        if shard_dim == 0:
            local = torch.cat([shard(s, 0, self.tp_rank, self.tp_size) for s in slices])
        elif shard_dim == 1:
            local = shard(torch.cat(slices), 1, self.tp_rank, self.tp_size)
        else:
            local = torch.cat(slices)
        self.quant_method.create_weights(self, local, full_absmax, self.params_dtype)
        if bias:
            full_bias = [init_normal(prefix, f"bias.{i}", (n,), std=0.02) for i, n in enumerate(output_sizes)]
            b = torch.cat([shard(x, 0, self.tp_rank, self.tp_size) for x in full_bias]) if shard_dim == 0 else torch.cat(full_bias)
            self.bias = nn.Parameter(b.to(self.params_dtype), requires_grad=False)
        else:
            self.bias = None

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_sizes}, tp={self.tp_size}, method={type(self.quant_method).__name__}"


@PluggableLayer.register("replicated_linear")
class ReplicatedLinear(LinearBase):
    """The full weight on every rank (e.g. a MoE router)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, quant_config: Fp8Config | None = None,
                 prefix: str = "", params_dtype: torch.dtype | None = None) -> None:
        super().__init__(input_size, [output_size], bias=bias, quant_config=quant_config, prefix=prefix,
                         params_dtype=params_dtype, shard_dim=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


@PluggableLayer.register("column_parallel_linear")
class ColumnParallelLinear(LinearBase):
    """Output dimension sharded; ``gather_output`` concatenates the shards on every rank."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, gather_output: bool = False,
                 quant_config: Fp8Config | None = None, prefix: str = "", params_dtype: torch.dtype | None = None,
                 *, output_sizes: list[int] | None = None) -> None:
        sizes = list(output_sizes) if output_sizes is not None else [output_size]
        tp = get_tp_world_size()
        for n in sizes:
            divide(n, tp, f"{type(self).__name__} {prefix!r} output size")
        super().__init__(input_size, sizes, bias=bias, quant_config=quant_config, prefix=prefix,
                         params_dtype=params_dtype, shard_dim=0)
        self.gather_output = gather_output
        self.output_sizes_per_partition = [n // tp for n in sizes]
        self.output_size_per_partition = sum(self.output_sizes_per_partition)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.quant_method.apply(self, x, self.bias)
        if self.gather_output and len(self.output_sizes) == 1:
            out = tensor_model_parallel_all_gather(out, dim=-1)
        elif self.gather_output and self.tp_size > 1:
            raise NotImplementedError("gather_output with packed slices would interleave shards; gather each slice")
        return out


@PluggableLayer.register("merged_column_parallel_linear")
class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs packed in one matmul (e.g. ``gate_up_proj``)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False, gather_output: bool = False,
                 quant_config: Fp8Config | None = None, prefix: str = "", params_dtype: torch.dtype | None = None) -> None:
        super().__init__(input_size, sum(output_sizes), bias=bias, gather_output=gather_output, quant_config=quant_config,
                         prefix=prefix, params_dtype=params_dtype, output_sizes=list(output_sizes))


@PluggableLayer.register("qkv_parallel_linear")
class QKVParallelLinear(ColumnParallelLinear):
    """Packed q, k, v projections; each rank holds its heads of each: output ``[q_r | k_r | v_r]``."""

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int, total_num_kv_heads: int | None = None,
                 bias: bool = False, quant_config: Fp8Config | None = None, prefix: str = "",
                 params_dtype: torch.dtype | None = None) -> None:
        total_num_kv_heads = total_num_heads if total_num_kv_heads is None else total_num_kv_heads
        if total_num_heads % total_num_kv_heads:
            raise ValueError(f"QKVParallelLinear {prefix!r}: {total_num_heads} heads not a multiple of {total_num_kv_heads} KV heads")
        tp = get_tp_world_size()
        self_heads = divide(total_num_heads, tp, f"QKVParallelLinear {prefix!r} number of heads")
        self_kv = divide(total_num_kv_heads, tp, f"QKVParallelLinear {prefix!r} number of KV heads")
        sizes = [total_num_heads * head_size, total_num_kv_heads * head_size, total_num_kv_heads * head_size]
        super().__init__(hidden_size, sum(sizes), bias=bias, quant_config=quant_config, prefix=prefix,
                         params_dtype=params_dtype, output_sizes=sizes)
        self.hidden_size, self.head_size = hidden_size, head_size
        self.total_num_heads, self.total_num_kv_heads = total_num_heads, total_num_kv_heads
        self.num_heads, self.num_kv_heads = self_heads, self_kv
        self.q_size, self.kv_size = self_heads * head_size, self_kv * head_size


@PluggableLayer.register("row_parallel_linear")
class RowParallelLinear(LinearBase):
    """Input dimension sharded; partial products summed by one all-reduce (unless
    ``reduce_results=False``: the caller reduces, e.g. a MoE block adding shared experts)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, input_is_parallel: bool = True,
                 reduce_results: bool = True, quant_config: Fp8Config | None = None, prefix: str = "",
                 params_dtype: torch.dtype | None = None) -> None:
        tp = get_tp_world_size()
        divide(input_size, tp, f"RowParallelLinear {prefix!r} input size")
        super().__init__(input_size, [output_size], bias=False, quant_config=quant_config, prefix=prefix,
                         params_dtype=params_dtype, shard_dim=1)
        self.input_size_per_partition = input_size // tp
        self.input_is_parallel = input_is_parallel
        self.reduce_results = reduce_results
        # The bias is added once, after the reduction (never per rank).
        self.bias = (nn.Parameter(init_normal(prefix, "bias.0", (output_size,), std=0.02).to(self.params_dtype),
                                  requires_grad=False) if bias else None)

    def partial_forward(self, x_local: torch.Tensor) -> torch.Tensor:
        """This rank's partial product (no reduction, no bias): the LoRA wrapper adds to it."""
        return self.quant_method.apply(self, x_local, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel and self.tp_size > 1:
            x = x.narrow(-1, self.tp_rank * self.input_size_per_partition, self.input_size_per_partition)
        out = self.partial_forward(x)
        if self.reduce_results:
            out = tensor_model_parallel_all_reduce(out)
        if self.bias is not None and (self.reduce_results or self.tp_rank == 0):
            out = out + self.bias  # unreduced: only rank 0 adds it, so the caller's sum has it once
        return out
