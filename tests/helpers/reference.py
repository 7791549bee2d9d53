"""Independent eager references and small test fixtures for the foundation ops.

Everything here is written from the op *definitions* (docstrings / the issue), not from
the implementation: attention is computed per request and per head with a plain loop over
contiguous history tensors (no paged cache, no padding, no SDPA), MoE token by token,
norms and quantisation in float64. Tests import it as ``from tests.helpers import reference as ref``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from tests.helpers.fp8 import FP8, FP8_MAX, fp8_bits  # noqa: F401  (re-exported for the op tests)

# Comparison tolerances per model dtype (outputs are rounded to that dtype at the end).
TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
}


# ----------------------------------------------------------------------------- norms / act


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` in float64, rounded to ``x.dtype``."""
    xd = x.double()
    return (xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + eps) * weight.double()).to(x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` with gate the first half of the last dim, in float64."""
    d = x.shape[-1] // 2
    gate, up = x.double()[..., :d], x.double()[..., d:]
    return (gate / (1.0 + torch.exp(-gate)) * up).to(x.dtype)


# ----------------------------------------------------------------------------- fp8


def quant_fp8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Static per-tensor e4m3: divide by the scale in fp32, saturate to +-448, round to fp8."""
    s = float(scale)
    q = (x.to(torch.float32) / torch.tensor(s, dtype=torch.float32)).clamp(-FP8_MAX, FP8_MAX)
    return q.to(FP8)


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
              out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantise both fp8 operands to float64, ``a @ b.T``, add bias, round to ``out_dtype``."""
    out = (a.double() * scale_a.double()) @ (b.double() * scale_b.double()).t()
    if bias is not None:
        out = out + bias.double()
    return out.to(out_dtype)


# ----------------------------------------------------------------------------- attention


@dataclass
class Request:
    """One request of a step: its cached history and this step's new tokens."""

    hist_k: torch.Tensor  # [context_len, Hkv, D]
    hist_v: torch.Tensor
    new_q: torch.Tensor  # [query_len, Hq, D]
    new_k: torch.Tensor  # [query_len, Hkv, D]
    new_v: torch.Tensor
    blocks: list[int]  # physical KV-cache blocks, in logical order


def fill_paged_cache(kv_cache: torch.Tensor, requests: Sequence[Request]) -> None:
    """Write each request's history at position ``p`` -> ``(blocks[p // bs], p % bs)``."""
    bs = kv_cache.shape[2]
    for r in requests:
        for p in range(r.hist_k.shape[0]):
            kv_cache[0, r.blocks[p // bs], p % bs] = r.hist_k[p]
            kv_cache[1, r.blocks[p // bs], p % bs] = r.hist_v[p]


def read_paged(kv_cache: torch.Tensor, blocks: Sequence[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A request's first ``length`` cached keys and values, gathered position by position."""
    bs = kv_cache.shape[2]
    ks = [kv_cache[0, blocks[p // bs], p % bs] for p in range(length)]
    vs = [kv_cache[1, blocks[p // bs], p % bs] for p in range(length)]
    empty = kv_cache.new_zeros((0, *kv_cache.shape[3:]))
    return (torch.stack(ks) if ks else empty), (torch.stack(vs) if vs else empty)


def attention_request(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal GQA attention of one request: ``q [Q, Hq, D]`` are the LAST ``Q`` positions of
    ``k, v [S, Hkv, D]``. Query head ``h`` reads KV head ``h // (Hq // Hkv)``. float64."""
    nq, hq, _ = q.shape
    s, hkv, _ = k.shape
    group = hq // hkv
    out = torch.zeros(q.shape, dtype=torch.float64)
    for h in range(hq):
        kh, vh = k[:, h // group].double(), v[:, h // group].double()
        for i in range(nq):
            visible = s - nq + i + 1  # absolute position s-nq+i sees itself and all before
            scores = (kh[:visible] @ q[i, h].double()) * scale
            w = torch.exp(scores - scores.max())
            out[i, h] = (w / w.sum()) @ vh[:visible]
    return out


def attention(requests: Sequence[Request], scale: float) -> torch.Tensor:
    """The whole step: each request attends over ``cat(history, new)``; ``[T, Hq, D]`` float64."""
    outs = [
        attention_request(r.new_q, torch.cat([r.hist_k, r.new_k]), torch.cat([r.hist_v, r.new_v]), scale)
        for r in requests
    ]
    return torch.cat(outs) if outs else torch.zeros(0)


def attention_features_request(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *,
                               sliding_window: int | None = None, logits_soft_cap: float | None = None,
                               sinks: torch.Tensor | None = None) -> torch.Tensor:
    """``attention_request`` with the per-layer features, from their definitions, float64, explicit loops.

    Query ``i`` is absolute position ``p = S - Q + i``; it sees key positions ``j`` with
    ``j <= p`` and, with a window ``W``, ``j > p - W`` (transformers' ``kv_idx > q_idx - W``).
    Each score is ``scale * q.k``, then ``cap * tanh(score / cap)``; the weights are
    ``exp(score_j) / (exp(sink_h) + sum_visible exp(score))`` (no sink: the plain softmax)."""
    nq, hq, _ = q.shape
    s, hkv, _ = k.shape
    group = hq // hkv
    out = torch.zeros(q.shape, dtype=torch.float64)
    for h in range(hq):
        for i in range(nq):
            p = s - nq + i
            logits, rows = [], []
            for j in range(s):
                if j > p or (sliding_window is not None and j <= p - sliding_window):
                    continue
                x = float(k[j, h // group].double() @ q[i, h].double()) * scale
                if logits_soft_cap is not None:
                    x = logits_soft_cap * math.tanh(x / logits_soft_cap)
                logits.append(x)
                rows.append(v[j, h // group].double())
            extra = [float(sinks[h])] if sinks is not None else []
            m = max(logits + extra)
            weights = [math.exp(x - m) for x in logits]
            denom = sum(weights) + sum(math.exp(x - m) for x in extra)
            for w, row in zip(weights, rows):
                out[i, h] += (w / denom) * row
    return out


def attention_features(requests: Sequence[Request], scale: float, *, sliding_window: int | None = None,
                       logits_soft_cap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """The whole step with features (``attention_features_request`` per request); ``[T, Hq, D]`` float64."""
    outs = [
        attention_features_request(r.new_q, torch.cat([r.hist_k, r.new_k]), torch.cat([r.hist_v, r.new_v]), scale,
                                   sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, sinks=sinks)
        for r in requests
    ]
    return torch.cat(outs) if outs else torch.zeros(0)


class AttnLayer(nn.Module):
    """The state ``unified_attention_with_output`` resolves by name: a paged KV cache and a scale."""

    def __init__(self, prefix: str, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.prefix = prefix
        self.scale = 1.0 / math.sqrt(head_size)
        self.register_buffer("kv_cache", torch.zeros(2, num_blocks, block_size, num_kv_heads, head_size, dtype=dtype))


# ----------------------------------------------------------------------------- MoE


def moe(x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
        top_k: int, renormalize: bool) -> torch.Tensor:
    """Token by token: softmax over experts, the ``top_k`` largest, optional renormalisation,
    ``sum_j w_j * W2_j (silu(gate_j x) * up_j x)`` with ``w13 = [gate; up]``. float64."""
    num_tokens, _ = x.shape
    inter = w13.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(num_tokens):
        logits = router_logits[t].double()
        probs = torch.exp(logits - logits.max())
        probs = probs / probs.sum()
        chosen = sorted(range(probs.numel()), key=lambda e: -float(probs[e]))[:top_k]
        weights = [float(probs[e]) for e in chosen]
        if renormalize:
            total = sum(weights)
            weights = [w / total for w in weights]
        xt = x[t].double()
        for e, w in zip(chosen, weights):
            gate = w13[e, :inter].double() @ xt
            up = w13[e, inter:].double() @ xt
            act = gate / (1.0 + torch.exp(-gate)) * up
            out[t] += w * (w2[e].double() @ act)
    return out


class SharedExpert(nn.Module):
    """A dense SiLU-gated MLP, the kind of shared expert ``moe_forward_shared`` runs."""

    def __init__(self, hidden: int, inter: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.w13 = nn.Parameter(torch.randn(2 * inter, hidden, dtype=dtype) / math.sqrt(hidden))
        self.w2 = nn.Parameter(torch.randn(hidden, inter, dtype=dtype) / math.sqrt(inter))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(silu_and_mul(torch.nn.functional.linear(x, self.w13)), self.w2)


class MoELayer(nn.Module):
    """The state the MoE ops resolve by name."""

    def __init__(self, prefix: str, num_experts: int, hidden: int, inter: int, top_k: int, renormalize: bool,
                 dtype: torch.dtype = torch.float32, shared_inter: int | None = None) -> None:
        super().__init__()
        self.prefix = prefix
        self.top_k = top_k
        self.renormalize = renormalize
        self.w13_weight = nn.Parameter(torch.randn(num_experts, 2 * inter, hidden, dtype=dtype) / math.sqrt(hidden),
                                       requires_grad=False)
        self.w2_weight = nn.Parameter(torch.randn(num_experts, hidden, inter, dtype=dtype) / math.sqrt(inter),
                                      requires_grad=False)
        self.shared_experts = None if shared_inter is None else SharedExpert(hidden, shared_inter, dtype)


# ----------------------------------------------------------------------------- fake tensors


def fake_outputs(op: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``op`` under ``FakeTensorMode`` on fake copies of the tensor args; tensors -> meta."""
    with FakeTensorMode() as mode:
        fargs = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fkw = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return op(*fargs, **fkw), fargs


def assert_fake_matches_real(op: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """The fake (meta) implementation gives the same output structure, shapes and dtypes."""
    real = op(*args, **kwargs)
    fake, _ = fake_outputs(op, *args, **kwargs)
    reals = real if isinstance(real, tuple) else (real,)
    fakes = fake if isinstance(fake, tuple) else (fake,)
    assert len(reals) == len(fakes), (len(reals), len(fakes))
    for r, f in zip(reals, fakes):
        assert (r.shape, r.dtype) == (f.shape, f.dtype), f"real {r.shape} {r.dtype} vs fake {f.shape} {f.dtype}"
