"""How the CPU kernel of ``unified_attention_with_output`` batches requests (``ops/attention.py``).

The op runs a decode-first batch as at most two padded groups (decodes, prefills) whose gather
indices and masks are built once per step from the batch metadata and cached on it. Checked here,
against ``reference.attention_features`` (float64, per request, per head, per key), are what that
design could get wrong and the other attention tests do not reach: the padding used where the
exact lengths cannot be read without a device sync, block-table entries past a request's blocks,
cache slots past a sequence holding non-finite garbage, and the per-step plan cache (shared by
the step's layers, rebuilt when the metadata tensors change in place).
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from hypothesis import given, settings

import layerpass.ops.attention as attention_mod
from tests.helpers import reference as ref
from tests.ops.test_attention import make_case, run
from tests.ops.test_attention_features import expected, feature_cases, set_features
from layerpass.ops import encode_layer_name, set_forward_context

FEATURES = [
    {},
    {"sliding_window": 3},
    {"sliding_window": 5, "logits_soft_cap": 2.0, "sinks": torch.tensor([0.5, -1.0, 2.0, 0.0])},
]


def mixed_case(dtype=torch.float32, seed: int = 3):
    """Decodes over short and long histories, a prefill chunk over history and a fresh prefill."""
    return make_case(decode_ctx=[2, 37, 9], prefills=[(7, 20), (3, 0)], num_kv_heads=2, group=2, head_size=8,
                     block_size=4, dtype=dtype, seed=seed)


def check(case, features: dict, md=None) -> torch.Tensor:
    set_features(case, **features)
    q, k, v = case.qkv()
    out = torch.empty_like(q)
    with set_forward_context(md if md is not None else case.metadata(), case.registry):
        torch.ops.layerpass.unified_attention_with_output(q, k, v, out, encode_layer_name(case.layer.prefix))
    torch.testing.assert_close(out.double(), expected(case, **features), **ref.TOL[case.dtype])
    return out


@settings(max_examples=20, deadline=None)
@given(feature_cases())
def test_plan_off_the_host_matches_reference(cf) -> None:
    """Off the CPU the plan reads no tensor value: padded lengths are host-known bounds (block-table
    width, prefill tokens) instead of the exact maxima, the slots past each sequence a mask instead
    of a list. More padding, same result."""
    case, features = cf
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention_mod, "_on_host", lambda t: False)
        check(case, features)


@pytest.mark.parametrize("features", FEATURES, ids=["plain", "window", "all"])
@pytest.mark.parametrize("junk", [-1, 10_000])
def test_block_table_entries_past_a_request_are_never_read(features: dict, junk: int) -> None:
    """A table wider than its rows need, padded with ids that are no block (-1, out of range)."""
    case = mixed_case()
    md = case.metadata()
    wide = torch.full((md.num_reqs, md.block_table.shape[1] + 3), junk, dtype=md.block_table.dtype)
    for i, r in enumerate(case.requests):
        wide[i, :len(r.blocks)] = torch.tensor(r.blocks)
    check(case, features, dataclasses.replace(md, block_table=wide))


@pytest.mark.parametrize("on_host", [True, False], ids=["host", "device"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("features", FEATURES, ids=["plain", "window", "all"])
def test_non_finite_cache_garbage_past_each_sequence_is_not_read(dtype: torch.dtype, features: dict,
                                                                 on_host: bool) -> None:
    """Every slot that is not some request's history holds NaN / inf (the rest of a request's last
    block, blocks of no request): the output is finite and exact."""
    case = mixed_case(dtype)
    cache = case.layer.kv_cache
    cache[0].fill_(float("nan"))
    cache[1].fill_(float("inf"))
    cache[1, ::2].fill_(float("nan"))
    ref.fill_paged_cache(cache, case.requests)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention_mod, "_on_host", lambda t: on_host)
        out = check(case, features)
    assert out.isfinite().all()


def test_plan_built_once_per_step_per_window_and_rebuilt_when_metadata_changes() -> None:
    calls = []
    real = attention_mod._group

    def counting(*args, **kwargs):
        calls.append(inspect.signature(real).bind(*args, **kwargs).arguments["sliding_window"])
        return real(*args, **kwargs)

    case = mixed_case()
    md = case.metadata()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention_mod, "_group", counting)
        for features in (FEATURES[0], FEATURES[1], FEATURES[0], FEATURES[2], FEATURES[1]):  # layers of one step
            check(case, features, md)
        assert calls == [None, None, 3, 3, 5, 5]  # decodes + prefills, once per window
        # the same metadata object updated in place for another step of the same shape: rebuilt
        other = mixed_case(seed=11)  # same lengths, other blocks and values
        other_md = other.metadata()
        for name in ("query_start_loc", "seq_lens", "slot_mapping", "block_table"):
            getattr(md, name).copy_(getattr(other_md, name))
        calls.clear()
        check(other, FEATURES[2], md)
        check(other, FEATURES[2], md)
        assert calls == [5, 5]
        # a field replaced by another tensor with the same values: rebuilt too (the cache keys on identity)
        md.seq_lens = md.seq_lens.clone()
        check(other, FEATURES[0], md)
        assert calls == [5, 5, None, None]


def test_single_group_batches_and_one_token_prefills() -> None:
    """Decodes only, prefills only, and prefills of one token over no history (Q = 1, not decodes)."""
    for decode_ctx, prefills in (([4, 1, 30], []), ([], [(1, 0), (1, 0), (6, 3)]), ([], [(1, 0)]), ([5], [(1, 0)])):
        case = make_case(decode_ctx=decode_ctx, prefills=prefills, num_kv_heads=1, group=3, head_size=4,
                         block_size=2, dtype=torch.float32, seed=len(prefills))
        for features in FEATURES:
            check(case, {**features, "sinks": None if "sinks" not in features else torch.tensor([0.5, -1.0, 2.0])})


def test_strided_query() -> None:
    """Queries split out of a fused qkv projection (not contiguous), as ``Attention`` passes them."""
    case = mixed_case()
    q, k, v = case.qkv()
    fused = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    qs, ks, vs = fused.split([hq * d, hkv * d, hkv * d], dim=1)
    qs = qs.unflatten(1, (hq, d))
    assert not qs.is_contiguous()
    out = torch.empty_like(q)
    with set_forward_context(case.metadata(), case.registry):
        torch.ops.layerpass.unified_attention_with_output(qs, ks.unflatten(1, (hkv, d)), vs.unflatten(1, (hkv, d)),
                                                          out, encode_layer_name(case.layer.prefix))
    torch.testing.assert_close(out, run(case, torch.empty_like(q)))
