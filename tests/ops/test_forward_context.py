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


@pytest.mark.parametrize(
    "args,fragment",
    [
        (([2.5], [0], [[0]], 4), r"query_lens\[0\] must be an int, got 2.5 \(float\)"),
        ((["53"], [0], [[0]], 4), r"query_lens\[0\] must be an int, got '53' \(str\)"),
        (([True], [0], [[0]], 4), r"query_lens\[0\] must be an int, got True \(bool\)"),
        (([2], [0.0], [[0]], 4), r"context_lens\[0\] must be an int"),
        (([2], [0], [[0.5]], 4), r"block_tables\[0\]\[0\] must be an int"),
        (([2], [0], [[0]], 4, [1.0]), r"state_indices\[0\] must be an int"),
        ((3, [0], [[0]], 4), r"query_lens must be a sequence of ints, got int"),
    ],
)
def test_non_int_lengths_are_named(args, fragment) -> None:
    """Before: a raw TypeError from deep inside (slice indices, int + str) or a float accepted."""
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


# ------------------------------------------------ validation at construction (one path with the builder)
import dataclasses  # noqa: E402

from tests.helpers import reference as ref  # noqa: E402


def fields_of(md: BatchMetadata) -> dict:
    return {f.name: getattr(md, f.name) for f in dataclasses.fields(md)}


def rebuild(md: BatchMetadata, **changes) -> BatchMetadata:
    """A hand-built ``BatchMetadata``: the builder's fields with some replaced."""
    return BatchMetadata(**dict(fields_of(md), **changes))


def valid_md() -> BatchMetadata:
    return build_batch_metadata([1, 3], [5, 0], [[0, 1], [2]], 4, state_indices=[0, 1])


def test_builder_output_rebuilds_unchanged() -> None:
    md = valid_md()
    again = rebuild(md)
    assert md.block_size == 4 and again.slot_mapping.tolist() == md.slot_mapping.tolist()


@settings(max_examples=40, deadline=None)
@given(batches(), st.data())
def test_duplicate_slot_mapping_is_rejected(batch, data) -> None:
    """Before: a hand-built metadata with two tokens on one KV slot ran and returned garbage."""
    reqs, _, tables, block_size, states = batch
    md = build_batch_metadata([q for q, _ in reqs], [c for _, c in reqs], tables, block_size, state_indices=states)
    if md.num_tokens < 2:
        md = valid_md()
    i, j = data.draw(st.lists(st.integers(0, md.num_tokens - 1), min_size=2, max_size=2, unique=True))
    slots = md.slot_mapping.clone()
    slots[j] = slots[i]
    with pytest.raises(ValueError, match=rf"slot_mapping.*{int(slots[i])}.*more than one token"):
        rebuild(md, slot_mapping=slots)
    with pytest.raises(ValueError, match=r"slot_mapping"):  # without block_size: the duplicate alone
        rebuild(md, slot_mapping=slots, block_size=None)


@settings(max_examples=40, deadline=None)
@given(batches(), st.data())
def test_seq_lens_shorter_than_query_is_rejected(batch, data) -> None:
    reqs, _, tables, block_size, _ = batch
    if not reqs:
        reqs, tables, block_size = [(3, 0)], [[0]], 4
    md = build_batch_metadata([q for q, _ in reqs], [c for _, c in reqs], tables, block_size)
    i = data.draw(st.integers(0, md.num_reqs - 1))
    seq = md.seq_lens.clone()
    seq[i] = data.draw(st.integers(0, int(md.query_lens[i]) - 1))
    with pytest.raises(ValueError, match=rf"seq_lens\[{i}\]=.*shorter than its query length"):
        rebuild(md, seq_lens=seq, block_size=None)


@pytest.mark.parametrize(
    "change,fragment",
    [
        (dict(slot_mapping=torch.tensor([5, 4, 6, 7], dtype=torch.int32)), r"slot_mapping must be int64"),
        (dict(slot_mapping=torch.tensor([-1, 8, 9, 10])), r"slot_mapping\[0\]=-1.*>= 0"),
        (dict(slot_mapping=torch.tensor([5, 8, 9])), r"slot_mapping.*shape \[4\]"),
        (dict(slot_mapping=torch.tensor([5, 8, 9, 11])), r"slot_mapping\[3\]=11.*block table.*slot 10"),
        (dict(block_table=torch.tensor([[0], [2]], dtype=torch.int32)), r"request 0 needs 6 KV slots.*block_table holds 4"),
        (dict(block_table=torch.tensor([[0, 1, 0]], dtype=torch.int32)), r"block_table.*\[2, "),
        (dict(block_table=torch.tensor([[0, -1], [2, 0]], dtype=torch.int32)), r"block_table\[0, 1\]=-1"),
        (dict(num_decodes=2, num_decode_tokens=2, num_prefills=0, num_prefill_tokens=2), r"decode request 1 has 3"),
        (dict(num_decode_tokens=2), r"num_decode_tokens=2.*num_decodes=1"),
        (dict(num_prefill_tokens=4), r"query_start_loc.*3 prefill tokens.*num_prefill_tokens=4"),
        (dict(query_start_loc=torch.tensor([0, 1, 1, 4], dtype=torch.int32)), r"query_start_loc.*shape \[3\]"),
        (dict(query_start_loc=torch.tensor([1, 2, 5], dtype=torch.int32)), r"query_start_loc\[0\] must be 0"),
        (dict(query_start_loc=torch.tensor([0, 1, 1], dtype=torch.int32)), r"query lengths must be >= 1"),
        (dict(query_start_loc=torch.tensor([0.0, 1.0, 4.0])), r"query_start_loc must be an integer"),
        (dict(seq_lens=torch.tensor([6])), r"seq_lens.*shape \[2\]"),
        (dict(state_indices=torch.tensor([1, 1])), r"state_indices.*repeat"),
        (dict(state_indices=torch.tensor([0, -2])), r"state_indices\[1\]=-2"),
        (dict(has_initial_state=torch.tensor([1, 0])), r"has_initial_state must be bool"),
        (dict(num_decodes=-1), r"num_decodes must be an int >= 0"),
        (dict(num_decodes=True), r"num_decodes must be an int >= 0"),
        (dict(block_size=0), r"block_size must be a positive int"),
    ],
)
def test_inconsistent_metadata_is_rejected(change, fragment) -> None:
    with pytest.raises(ValueError, match=fragment):
        rebuild(valid_md(), **change)


def registry_with_attention(num_blocks: int, block_size: int) -> tuple[LayerRegistry, ref.AttnLayer]:
    reg = LayerRegistry("m")
    layer = ref.AttnLayer("model.layers.0.self_attn.attn", num_blocks, block_size, num_kv_heads=1, head_size=8)
    reg.register(layer.prefix, layer)
    return reg, layer


def run_attention(md: BatchMetadata, reg: LayerRegistry) -> None:
    t = md.num_tokens
    q, kv = torch.randn(t, 2, 8), torch.randn(t, 1, 8)
    with set_forward_context(md, reg):
        torch.ops.layerpass.unified_attention_with_output(q, kv, kv, torch.empty_like(q), "model.layers.0.self_attn.attn")


@pytest.mark.parametrize(
    "make_md,geometry,fragment",
    [
        # hand-built slots 12, 13, but the layer's cache has 3 blocks of 4 = slots [0, 12)
        (lambda: rebuild(build_batch_metadata([2], [0], [[0]], 4), block_size=None, slot_mapping=torch.tensor([12, 13])),
         (3, 4), r"model\.layers\.0\.self_attn\.attn.*slot_mapping\[1\]=13 is out of range.*\[0, 12\)"),
        # block 3 of a cache with 3 blocks
        (lambda: build_batch_metadata([2], [0], [[3]], 4), (3, 4),
         r"model\.layers\.0\.self_attn\.attn.*block_table\[0, 0\] is block 3.*\[0, 3\)"),
        # metadata built for block size 4, layer's cache has blocks of 2
        (lambda: build_batch_metadata([2], [0], [[0]], 4), (4, 2),
         r"model\.layers\.0\.self_attn\.attn.*block size 2.*block_size=4"),
    ],
)
def test_metadata_checked_against_the_step_kv_caches(make_md, geometry, fragment) -> None:
    """Before: a raw IndexError from inside the attention op, naming neither layer nor field."""
    md = make_md()
    reg, _ = registry_with_attention(*geometry)
    with pytest.raises(ValueError, match=fragment):
        run_attention(md, reg)


def test_hand_built_block_table_too_small_for_the_layer() -> None:
    """No ``block_size`` in the metadata: the layer's block size decides coverage."""
    md = rebuild(build_batch_metadata([6], [0], [[0, 1]], 4), block_size=None,
                 block_table=torch.tensor([[0]], dtype=torch.int32), slot_mapping=torch.arange(6))
    reg, _ = registry_with_attention(4, 4)
    with pytest.raises(ValueError, match=r"self_attn\.attn.*request 0 needs 6 KV slots.*block_table holds 4"):
        run_attention(md, reg)


def test_valid_metadata_runs_against_a_large_enough_cache() -> None:
    md = build_batch_metadata([1, 3], [5, 0], [[0, 1], [2]], 4)
    reg, _ = registry_with_attention(3, 4)
    run_attention(md, reg)


def test_registry_check_follows_a_replaced_kv_cache() -> None:
    """The check is cached per metadata and registry, but a layer's new (smaller) cache is seen."""
    md = build_batch_metadata([2], [0], [[2]], 4)
    reg, layer = registry_with_attention(3, 4)
    run_attention(md, reg)
    layer.kv_cache = torch.zeros(2, 2, 4, 1, 8)  # now blocks [0, 2): block 2 is out of range
    with pytest.raises(ValueError, match=r"block_table\[0, 0\] is block 2, out of range"):
        run_attention(md, reg)


def test_the_registry_check_memo_is_no_field() -> None:
    """What the check remembers is the metadata's own attribute, outside eq / repr / replace."""
    md = build_batch_metadata([2], [0], [[1]], 4)
    reg, _ = registry_with_attention(2, 4)
    run_attention(md, reg)
    assert md.checked_for_registry is not None and md.checked_for_registry[0] is md.host
    again = rebuild(md)  # every field, as given: the memo is not one of them
    assert again == md and again.checked_for_registry is None
    assert dataclasses.replace(md).checked_for_registry is None and "checked_for_registry" not in repr(md)


def test_registry_check_sees_an_in_place_change_of_the_metadata() -> None:
    md = build_batch_metadata([2], [0], [[1]], 4)
    reg, _ = registry_with_attention(2, 4)
    run_attention(md, reg)
    md.block_table.fill_(5)  # in place, after construction: caught by the next step's check
    with pytest.raises(ValueError, match=r"block_table\[0, 0\] is block 5"):
        run_attention(md, reg)
