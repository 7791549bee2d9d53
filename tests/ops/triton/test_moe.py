"""Triton MoE: sort/align against a torch construction, grouped-GEMM experts against the CPU ops."""

from __future__ import annotations

from tests.helpers.triton import load_interpreted

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from layerpass.ops import LayerRegistry, encode_layer_name, set_forward_context  # noqa: E402
from layerpass.ops.moe import fused_experts_ref, select_experts  # noqa: E402
from layerpass.ops.moe import moe_forward as checked_moe_forward  # noqa: E402

moe = load_interpreted("moe")
ops = torch.ops.layerpass
# No shrink phase: each example runs interpreted kernels; shrinking a failure takes minutes.
FAST = dict(deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))


def expected_alignment(topk_ids: torch.Tensor, block_m: int, num_experts: int) -> tuple[list[int], list[int]]:
    """Independent construction: stable sort of pair ids by expert, pad each run to ``block_m``."""
    flat = topk_ids.reshape(-1).tolist()
    numel = len(flat)
    sorted_ids: list[int] = []
    expert_ids: list[int] = []
    for e in range(num_experts):
        run = [p for p, x in enumerate(flat) if x == e]
        if not run:
            continue
        pad = -len(run) % block_m
        sorted_ids += run + [numel] * pad
        expert_ids += [e] * ((len(run) + pad) // block_m)
    return sorted_ids, expert_ids


@settings(max_examples=15, **FAST)
@given(
    tokens=st.integers(0, 50),
    top_k=st.integers(1, 3),
    extra_experts=st.integers(0, 8),
    block_m=st.sampled_from([1, 2, 4, 16]),
    seed=st.integers(0, 2**16),
)
def test_moe_align_block_size(tokens: int, top_k: int, extra_experts: int, block_m: int, seed: int) -> None:
    num_experts = top_k + extra_experts
    g = torch.Generator().manual_seed(seed)
    # distinct experts per token, as top-k gives; skewed so some experts get nothing
    scores = torch.rand(tokens, num_experts, generator=g) ** 3
    topk_ids = torch.topk(scores, top_k, dim=1).indices
    sorted_ids, expert_ids, total = moe.moe_align_block_size(topk_ids, block_m, num_experts)
    exp_sorted, exp_experts = expected_alignment(topk_ids, block_m, num_experts)
    n = int(total)
    assert n == len(exp_sorted)
    assert sorted_ids[:n].tolist() == exp_sorted
    assert bool((sorted_ids[n:] == tokens * top_k).all())  # the rest is sentinel
    assert expert_ids[: n // block_m].tolist() == exp_experts
    assert bool((expert_ids[n // block_m :] == -1).all())


def test_moe_align_rejects_bad_block() -> None:
    with pytest.raises(ValueError, match="power of two"):
        moe.moe_align_block_size(torch.zeros(2, 1, dtype=torch.long), 12, 4)
    with pytest.raises(ValueError, match="tokens, top_k"):
        moe.moe_align_block_size(torch.zeros(4, dtype=torch.long), 16, 4)
    x, w13, w2 = torch.randn(2, 8), torch.randn(2, 8, 8), torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match="power of two >= 16"):
        moe.fused_experts_triton(x, w13, w2, torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long), block_m=8)


def _weights(seed: int, e: int, hidden: int, inter: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(e, 2 * inter, hidden, generator=g) / hidden**0.5).to(dtype)
    w2 = (torch.randn(e, hidden, inter, generator=g) / inter**0.5).to(dtype)
    return w13, w2


@settings(max_examples=12, **FAST)
@given(
    tokens=st.integers(1, 24),
    hidden=st.sampled_from([8, 24, 40]),
    inter=st.sampled_from([4, 16, 20]),
    num_experts=st.integers(1, 6),
    top_k=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    block_m=st.sampled_from([None, 32]),
    seed=st.integers(0, 2**16),
)
def test_fused_experts_match_reference(
    tokens: int, hidden: int, inter: int, num_experts: int, top_k: int, dtype: torch.dtype, block_m: int | None, seed: int
) -> None:
    top_k = min(top_k, num_experts)
    w13, w2 = _weights(seed, num_experts, hidden, inter, dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    weights, ids = select_experts(torch.randn(tokens, num_experts, generator=g), top_k, renormalize=bool(seed % 2))
    out = moe.fused_experts_triton(x, w13, w2, weights, ids, block_m=block_m)
    ref = fused_experts_ref(x, w13, w2, weights, ids)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    else:  # intermediates in the model dtype (the reference keeps float32)
        torch.testing.assert_close(out, ref, rtol=3e-2, atol=3e-2)


class MoELayer(nn.Module):
    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, top_k: int, shared: nn.Module | None) -> None:
        super().__init__()
        self.w13_weight = nn.Parameter(w13, requires_grad=False)
        self.w2_weight = nn.Parameter(w2, requires_grad=False)
        self.top_k, self.renormalize = top_k, True
        self.shared_experts = shared


@torch.no_grad()
def test_moe_forward_and_shared_match_cpu_ops() -> None:
    w13, w2 = _weights(0, 4, 32, 16, torch.float32)
    shared = nn.Linear(32, 32)
    layer, plain = MoELayer(w13, w2, 2, shared), MoELayer(w13, w2, 2, None)
    registry = LayerRegistry("moe-test")
    registry.register("moe", layer)
    registry.register("plain", plain)
    x, logits = torch.randn(7, 32), torch.randn(7, 4)
    with set_forward_context(None, registry):
        routed, shared_out = moe.moe_forward_shared(x, logits, encode_layer_name("moe"))
        ref_routed, ref_shared = ops.moe_forward_shared(x, logits, encode_layer_name("moe"))
        torch.testing.assert_close(routed, ref_routed, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(shared_out, ref_shared)
        torch.testing.assert_close(
            moe.moe_forward(x, logits, encode_layer_name("plain")), ops.moe_forward(x, logits, encode_layer_name("plain")),
            rtol=1e-4, atol=1e-5,
        )
        with pytest.raises(ValueError, match="has no shared_experts"):
            moe.moe_forward_shared(x, logits, encode_layer_name("plain"))
        with pytest.raises(ValueError, match="experts"):  # the checked entry point (the kernel does not check)
            checked_moe_forward(x, logits[:, :3], encode_layer_name("plain"))
