"""Decode-first ``BatchMetadata`` from ``build_batch_metadata`` and the forward context."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from layerpass.ops import (
    BatchMetadata,
    LayerRegistry,
    build_batch_metadata,
    current_forward_context,
    get_batch_metadata,
    set_forward_context,
)

prefill = st.tuples(st.integers(1, 9), st.integers(0, 9)).filter(lambda qc: qc[0] > 1 or qc[1] == 0)


@st.composite
def batches(draw):
    """Decode-first requests with ragged lengths and random, non-overlapping block tables."""
    decodes = [(1, c) for c in draw(st.lists(st.integers(1, 20), max_size=4))]
    prefills = draw(st.lists(prefill, max_size=4))
    reqs = decodes + prefills
    block_size = draw(st.sampled_from([1, 2, 4, 16]))
    need = [-(-(q + c) // block_size) + draw(st.integers(0, 1)) for q, c in reqs]  # sometimes a spare block
    pool = draw(st.permutations(range(sum(need))))
    tables, start = [], 0
    for n in need:
        tables.append(list(pool[start:start + n]))
        start += n
    states = draw(st.permutations(range(len(reqs))))
    return reqs, len(decodes), tables, block_size, list(states)


@settings(max_examples=60, deadline=None)
@given(batches())
def test_metadata_fields(batch) -> None:
    reqs, num_decodes, tables, block_size, states = batch
    q_lens, c_lens = [q for q, _ in reqs], [c for _, c in reqs]
    md = build_batch_metadata(q_lens, c_lens, tables, block_size, state_indices=states)
    assert (md.num_decodes, md.num_decode_tokens) == (num_decodes, num_decodes)
    assert md.num_prefills == len(reqs) - num_decodes and md.num_reqs == len(reqs)
    assert md.num_prefill_tokens == sum(q_lens[num_decodes:]) and md.num_tokens == sum(q_lens)
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)
    assert md.query_start_loc.dtype == torch.int32 and md.query_start_loc.tolist() == starts
    assert md.seq_lens.dtype == torch.int32 and md.seq_lens.tolist() == [q + c for q, c in reqs]
    assert md.query_lens.tolist() == q_lens and md.context_lens.tolist() == c_lens
    assert md.block_table.dtype == torch.int32 and md.block_table.shape == (len(reqs), max([len(t) for t in tables] + [1]))
    for i, table in enumerate(tables):
        assert md.block_table[i, :len(table)].tolist() == table
    # the slot of token p of request i: its block's first slot + the offset in the block
    slots = [tables[i][p // block_size] * block_size + p % block_size
             for i, (q, c) in enumerate(reqs) for p in range(c, c + q)]
    assert md.slot_mapping.dtype == torch.int64 and md.slot_mapping.tolist() == slots
    assert len(set(slots)) == len(slots)  # distinct tables never share a slot
    assert md.state_indices.dtype == torch.int64 and md.state_indices.tolist() == states
    assert md.has_initial_state.tolist() == [c > 0 for c in c_lens]


@settings(max_examples=40, deadline=None)
@given(batches(), st.data())
def test_decode_after_prefill_is_rejected(batch, data) -> None:
    reqs, num_decodes, tables, block_size, _ = batch
    if num_decodes == 0 or num_decodes == len(reqs):
        reqs, tables = [(1, 3), (4, 0)], [[0], [1, 2]]  # always have something to reorder
        block_size, num_decodes = 4, 1
    # move one decode behind the first prefill
    i = data.draw(st.integers(0, num_decodes - 1))
    order = [j for j in range(len(reqs)) if j != i]
    order.insert(order.index(num_decodes) + 1, i)
    with pytest.raises(ValueError, match="not decode-first"):
        build_batch_metadata([reqs[j][0] for j in order], [reqs[j][1] for j in order], [tables[j] for j in order], block_size)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (([1, 2], [3], [[0], [1]], 4), "one entry per request"),
        (([0], [0], [[0]], 4), "query lengths must be >= 1"),
        (([2], [-1], [[0]], 4), "context lengths >= 0"),
        (([3], [2], [[0]], 4), "needs 5 KV slots"),
    ],
)
def test_bad_metadata_raises(args, fragment) -> None:
    with pytest.raises(ValueError, match=fragment):
        build_batch_metadata(*args)


def test_empty_batch() -> None:
    md = build_batch_metadata([], [], [], 4)
    assert md.num_reqs == md.num_tokens == 0 and md.query_start_loc.tolist() == [0]
    assert md.slot_mapping.numel() == 0 and md.slot_mapping.dtype == torch.int64


def test_context_nests_and_restores() -> None:
    assert current_forward_context() is None
    outer_md = build_batch_metadata([3], [0], [[0]], 4)
    inner_md = build_batch_metadata([1], [3], [[0]], 4)
    reg = LayerRegistry("r")
    with set_forward_context(outer_md, reg) as outer:
        assert current_forward_context() is outer and outer.registry is reg and get_batch_metadata() is outer_md
        with set_forward_context(inner_md):
            assert get_batch_metadata() is inner_md and current_forward_context().registry is None
        assert get_batch_metadata() is outer_md
    assert current_forward_context() is None


def test_context_restored_after_error() -> None:
    with pytest.raises(KeyError), set_forward_context(build_batch_metadata([2], [0], [[0]], 4)):
        raise KeyError("boom")
    assert current_forward_context() is None


def test_no_metadata_raises() -> None:
    with pytest.raises(RuntimeError, match="set_forward_context"):
        get_batch_metadata()
    with set_forward_context(None, LayerRegistry()), pytest.raises(RuntimeError, match="no batch metadata"):
        get_batch_metadata()


def test_context_is_per_thread() -> None:
    seen = []
    with set_forward_context(build_batch_metadata([2], [0], [[0]], 4)):
        thread = threading.Thread(target=lambda: seen.append(current_forward_context()))
        thread.start()
        thread.join()
    assert seen == [None]


def test_metadata_is_a_dataclass_with_defaults() -> None:
    md = BatchMetadata(0, 0, 1, 2, torch.tensor([0, 2], dtype=torch.int32), torch.tensor([2], dtype=torch.int32),
                       torch.tensor([0, 1]), torch.zeros(1, 1, dtype=torch.int32))
    assert md.state_indices is None and md.has_initial_state is None
    assert md.query_lens.tolist() == [2] and md.context_lens.tolist() == [0]
