"""Kernel benchmark: each Triton kernel against the torch implementation of its op.

On a CUDA machine, times both on the same inputs (``triton.testing.do_bench``, median ms),
checks they agree, and prints ``torch ms / triton ms``. Without CUDA (or without triton) it
says so and exits 0.

    python -m layerpass.bench.kernels [--dtype bf16] [--cases quant,attention_decode]
    python bench/kernels.py

``--device cpu --tiny`` runs the same cases on tiny shapes under the Triton interpreter: a
smoke test of this script, not a measurement.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Case:
    """One comparison: ``torch_fn`` and ``triton_fn`` take no arguments and return comparable tensors."""

    name: str
    shape: str
    torch_fn: Callable[[], Any]
    triton_fn: Callable[[], Any]


def _as_float(out: Any) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.float()


def build_cases(device: str, dtype: torch.dtype, tiny: bool) -> list[Case]:
    """The benchmark cases: realistic LLM shapes (``tiny``: a few elements each)."""
    from torch import nn

    from layerpass.ops import FP8_DTYPE, LayerRegistry, build_batch_metadata, encode_layer_name, set_forward_context
    from layerpass.ops.attention import paged_attention_ref, write_kv_cache
    from layerpass.ops.moe import fused_experts_ref, select_experts
    from layerpass.ops.norm import rms_norm_ref, silu_and_mul_ref
    from layerpass.ops.quant import quantize_fp8
    from layerpass.ops.triton import activation, attention, moe, norm_quant, quant

    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    tokens, hidden, inter = (8, 64, 32) if tiny else (4096, 4096, 14336)
    x, res = randn(tokens, hidden), randn(tokens, hidden)
    w = randn(hidden) + 1
    gate_up = randn(tokens, 2 * inter)
    scale = torch.tensor([0.05], device=device)
    eps = 1e-6

    def add_norm_ref(a: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        summed = (a.float() + r.float()).to(a.dtype)
        return rms_norm_ref(summed, w, eps), summed

    cases = [
        Case("static_fp8_quant", f"[{tokens}, {hidden}]",
             lambda: quantize_fp8(x, scale), lambda: quant.static_scaled_fp8_quant_functional(x, scale)),
        Case("rms_norm", f"[{tokens}, {hidden}]",
             lambda: rms_norm_ref(x, w, eps), lambda: norm_quant.rms_norm(x, w, eps)),
        Case("rms_norm+fp8", f"[{tokens}, {hidden}]",
             lambda: quantize_fp8(rms_norm_ref(x, w, eps), scale),
             lambda: norm_quant.rms_norm_static_fp8_quant(x, w, scale, eps)),
        Case("add+rms_norm", f"[{tokens}, {hidden}]",
             lambda: add_norm_ref(x, res), lambda: norm_quant.fused_add_rms_norm(x, res, w, eps)),
        Case("add+rms_norm+fp8", f"[{tokens}, {hidden}]",
             lambda: quantize_fp8(add_norm_ref(x, res)[0], scale),
             lambda: norm_quant.fused_add_rms_norm_static_fp8_quant(x, res, w, scale, eps)),
        Case("silu_and_mul", f"[{tokens}, {2 * inter}]",
             lambda: silu_and_mul_ref(gate_up), lambda: activation.silu_and_mul(gate_up)),
        Case("silu_and_mul+fp8", f"[{tokens}, {2 * inter}]",
             lambda: quantize_fp8(silu_and_mul_ref(gate_up), scale),
             lambda: activation.silu_and_mul_static_fp8_quant(gate_up, scale)),
    ]

    # paged attention: a decode batch and a prefill batch, GQA 32/8 heads of 128
    hq, hkv, d, bs = (4, 2, 16, 4) if tiny else (32, 8, 128, 16)

    class AttnLayer(nn.Module):
        def __init__(self, num_blocks: int) -> None:
            super().__init__()
            self.kv_cache = randn(2, num_blocks, bs, hkv, d)
            self.scale = d**-0.5

    for label, q_lens, ctx_lens in (
        ("attention_decode", [1] * (4 if tiny else 64), [9 if tiny else 2048] * (4 if tiny else 64)),
        ("attention_prefill", [7 if tiny else 1024] * 2, [0, 5 if tiny else 512]),
    ):
        need = [-(-(q + c) // bs) for q, c in zip(q_lens, ctx_lens)]
        tables, start = [], 0
        for n in need:
            tables.append(list(range(start, start + n)))
            start += n
        md = build_batch_metadata(q_lens, ctx_lens, tables, bs, device=device)
        layer = AttnLayer(start)
        registry = LayerRegistry(label)
        registry.register("attn", layer)
        t = md.num_tokens
        q, k, v = randn(t, hq, d), randn(t, hkv, d), randn(t, hkv, d)

        def torch_attn(q=q, k=k, v=v, md=md, layer=layer, registry=registry) -> torch.Tensor:
            write_kv_cache(layer.kv_cache, k, v, md.slot_mapping)
            return quantize_fp8(paged_attention_ref(q, layer.kv_cache, md, layer.scale).to(q.dtype), scale)

        def triton_attn(q=q, k=k, v=v, md=md, registry=registry) -> torch.Tensor:
            out = torch.empty(q.shape, dtype=FP8_DTYPE, device=q.device)
            with set_forward_context(md, registry):
                attention.unified_attention_with_output(q, k, v, out, encode_layer_name("attn"), scale)
            return out

        cases.append(Case(label + "+fp8", f"{len(q_lens)} reqs, {t} tokens, ctx {max(ctx_lens)}", torch_attn, triton_attn))

    # MoE: routed experts (Mixtral-like 8 experts, top-2)
    e, topk, mt, mh, mi = (4, 2, 6, 32, 16) if tiny else (8, 2, 512, 4096, 14336 // 4)
    w13, w2 = randn(e, 2 * mi, mh, scale=mh**-0.5), randn(e, mh, mi, scale=mi**-0.5)
    hs, logits = randn(mt, mh), randn(mt, e)
    weights, ids = select_experts(logits, topk, True)
    cases.append(Case("moe_experts", f"T={mt} H={mh} I={mi} E={e} k={topk}",
                      lambda: fused_experts_ref(hs, w13, w2, weights, ids),
                      lambda: moe.fused_experts_triton(hs, w13, w2, weights, ids)))
    cases.append(_linear_attention_case(device, dtype, tiny, randn))
    return cases


def _linear_attention_case(device: str, dtype: torch.dtype, tiny: bool, randn: Callable[..., torch.Tensor]) -> Case:
    """Lightning-style linear attention (decode recurrence + chunked prefill) through the op's CUDA
    kernel; each side starts from its own copy of the same recurrent state."""
    from torch import nn

    from layerpass.ops import LayerRegistry, build_batch_metadata, encode_layer_name, set_forward_context
    from layerpass.ops.linear_attention import linear_attention_ref
    from layerpass.ops.triton import linear_attention

    heads, dk, dv = (2, 16, 16) if tiny else (16, 128, 128)
    q_lens = [1] * (2 if tiny else 32) + [9 if tiny else 1024]
    ctx = [3] * (len(q_lens) - 1) + [0]
    md = build_batch_metadata(q_lens, ctx, [[r] for r in range(len(q_lens))], 4096,
                              state_indices=list(range(len(q_lens))), device=device)
    t = md.num_tokens
    q, k, v = randn(t, heads, dk, scale=dk**-0.5), randn(t, heads, dk), randn(t, heads, dv)
    state = randn(len(q_lens), heads, dk, dv)
    slopes = torch.linspace(0.02, 0.6, heads, device=device)

    class LinearAttnLayer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.state_cache, self.slopes = state.clone(), slopes

    layer = LinearAttnLayer()
    registry = LayerRegistry("linear_attention")
    registry.register("linear_attn", layer)

    def triton_la() -> torch.Tensor:
        layer.state_cache.copy_(state)
        out = torch.empty(q.shape[:2] + (dv,), dtype=q.dtype, device=q.device)
        with set_forward_context(md, registry):
            linear_attention.linear_attention_triton(q, k, v, out, encode_layer_name("linear_attn"))
        return out

    return Case("linear_attention", f"{len(q_lens)} reqs, {t} tokens, {heads} heads of {dk}",
                lambda: linear_attention_ref(q, k, v, state.clone(), slopes, md).to(q.dtype), triton_la)


def time_ms(fn: Callable[[], Any], device: str) -> float:
    """Median milliseconds per call."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: run under the Triton interpreter (a smoke test, not a measurement)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (use with --device cpu)")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    args = parser.parse_args(argv)

    if importlib.util.find_spec("triton") is None:
        print("triton is not installed (pip install 'layerpass[triton]'): no Triton kernels to benchmark")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: the Triton kernels serve CUDA tensors only; nothing to benchmark here "
              "(--device cpu --tiny runs a smoke test under the Triton interpreter)")
        return 0
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported by the kernel modules
        from triton.runtime.interpreter import InterpretedFunction

        from layerpass.ops.triton import attention

        if not isinstance(attention._paged_attention_kernel, InterpretedFunction):
            print("error: the kernels were imported before TRITON_INTERPRET=1 could be set; run this in a fresh process")
            return 2

    cases = build_cases(args.device, DTYPES[args.dtype], args.tiny)
    wanted = {c for c in args.cases.split(",") if c}
    unknown = wanted - {c.name for c in cases}
    if unknown:
        print(f"error: unknown case(s) {sorted(unknown)}; available: {[c.name for c in cases]}")
        return 2
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreter)"
    print(f"layerpass Triton kernels vs torch, {args.dtype}, on {device_name}")
    print(f"{'kernel':<24} {'shape':<36} {'torch ms':>10} {'triton ms':>10} {'speedup':>8} {'max |diff|':>11}")
    for case in cases:
        if wanted and case.name not in wanted:
            continue
        diff = (_as_float(case.torch_fn()) - _as_float(case.triton_fn())).abs().max().item()
        t_torch = time_ms(case.torch_fn, args.device)
        t_triton = time_ms(case.triton_fn, args.device)
        print(f"{case.name:<24} {case.shape:<36} {t_torch:>10.4f} {t_triton:>10.4f} {t_torch / t_triton:>7.2f}x {diff:>11.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
