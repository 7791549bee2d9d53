"""Attention projections: HF ``q/k/v_proj`` (or an already packed ``qkv_proj``) -> one ``QKVParallelLinear``."""

from __future__ import annotations

from torch import nn

from layerpass.layers import QKVParallelLinear

from .attention import GatheredPacked, TransformersAttention, packed_slices
from .conversion import Conversion
from .loading import load_linear
from .tp_plan import check_divisible

QKV_NAMES = ["q_proj", "k_proj", "v_proj"]
# the attention output projection's usual names (it reads the attention output, not hidden_states)
OUTPUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj")


def _other_readers_of_hidden(module: nn.Module, hidden: int) -> list[str]:
    """Linears of ``module`` besides q/k/v and its output projection that take ``hidden``-wide
    input: they read ``hidden_states`` (a gated attention's ``gate_proj``: AFMoE, Laguna, ...),
    which packing would replace by the packed projections."""
    return [name for name, child in module.named_children()
            if isinstance(child, nn.Linear) and name not in QKV_NAMES and name not in OUTPUT_NAMES
            and child.in_features == hidden]


def convert_attention_qkv(conv: Conversion, module: nn.Module, path: str) -> nn.Module | None:
    """``TransformersAttention`` over one packed ``qkv_proj`` where the three linears' layout packs
    (one head size, GQA group sizes, one plan style, biases on all or none) and nothing else in the
    module reads ``hidden_states``; else one parallel linear each and the module kept (None)."""
    q, k, v = (module._modules[n] for n in QKV_NAMES)
    head_dim = getattr(module, "head_dim", None)
    gather = conv.plan.packed_gather(path, QKV_NAMES)
    biases = [x.bias is not None for x in (q, k, v)]
    if (gather is None or not isinstance(head_dim, int) or len({q.in_features, k.in_features, v.in_features}) != 1
            or len(set(biases)) != 1 or q.out_features % head_dim or k.out_features % head_dim
            or k.out_features != v.out_features or (q.out_features // head_dim) % (k.out_features // head_dim)
            or _other_readers_of_hidden(module, q.in_features)):
        conv.convert_children(module, path)  # not a layout we pack (or hidden_states read elsewhere): one linear each
        return None
    heads, kv_heads = q.out_features // head_dim, k.out_features // head_dim
    check_divisible(kv_heads, f"{path}: number of KV heads")
    qkv = QKVParallelLinear(q.in_features, head_dim, heads, kv_heads, bias=biases[0], quant_config=conv.quant_config,
                            prefix=f"{path}.qkv_proj", params_dtype=conv.dtype)
    load_linear(qkv, [q.weight, k.weight, v.weight], [q.bias, k.bias, v.bias])
    for name, piece in zip(QKV_NAMES, packed_slices(qkv, gather)):
        setattr(module, name, piece)
    conv.convert_children(module, path)  # o_proj, q/k norms, ...
    return TransformersAttention(qkv, module)


def convert_packed_qkv(conv: Conversion, module: nn.Module, path: str) -> nn.Module:
    """An already packed ``qkv_proj`` (Phi-3): rows ``[q | k | v]`` -> ``QKVParallelLinear``."""
    lin, head_dim, c = module.qkv_proj, module.head_dim, conv.config
    heads = getattr(c, "num_attention_heads", None)
    kv_heads = getattr(module, "num_key_value_heads", None) or getattr(c, "num_key_value_heads", None) or heads
    gather = conv.plan.packed_gather(path, ["qkv_proj"])
    if (gather is None or not heads or lin.out_features != (heads + 2 * kv_heads) * head_dim
            or heads % kv_heads):
        return conv.linear(lin, f"{path}.qkv_proj")
    check_divisible(kv_heads, f"{path}: number of KV heads")
    qkv = QKVParallelLinear(lin.in_features, head_dim, heads, kv_heads, bias=lin.bias is not None,
                            quant_config=conv.quant_config, prefix=f"{path}.qkv_proj", params_dtype=conv.dtype)
    sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    load_linear(qkv, list(lin.weight.split(sizes)), list(lin.bias.split(sizes)) if lin.bias is not None else None)
    return GatheredPacked(qkv) if gather and qkv.tp_size > 1 else qkv
