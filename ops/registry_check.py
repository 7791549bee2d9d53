"""``check_metadata_for_registry``: a step's batch fits the caches of the layers it runs on.

Run by ``set_forward_context`` once per step, outside the compiled code, so a bad batch is a
``ValueError`` naming the layer and the field instead of an ``IndexError`` inside an op."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .batch_checks import check_block_coverage, check_slots_against_table, query_lens_of
from .batch_metadata import BatchMetadata, host_values
from .state import LayerRegistry

CACHE_ATTRS = ("kv_cache", "state_cache")  # the per-layer caches a batch indexes into


def check_metadata_for_registry(md: BatchMetadata, registry: LayerRegistry) -> None:
    """The batch fits the registry's caches, from the host values (``host_values``: no tensor is
    read back): the KV caches of its attention layers (one check per cache geometry, naming the
    first layer with it: slots, block ids, block size, table coverage) and the state caches of its
    recurrent layers (state slots in range and distinct)."""
    if md.num_reqs == 0:
        return
    kv, states = _cache_geometries(registry)
    if not kv and (not states or md.state_indices is None):
        return
    h = host_values(md)
    if h is None:
        return
    # once per (host values, geometries): a step re-run with the same metadata is not re-checked
    stamp = (md.block_size, frozenset(kv.items()), frozenset(states.items()))
    checked = md.checked_for_registry
    if checked is not None and checked[0] is h and checked[1] == stamp:
        return
    for (num_blocks, bs), name in sorted(kv.items()):
        _check_kv_cache(md, h.seq_lens, query_lens_of(h.query_start_loc), h.slot_mapping, h.block_table,
                        num_blocks, bs, f"attention layer {name!r}: ")
    if h.state_indices is not None:
        _check_state_slots(list(h.state_indices), states)
    md.checked_for_registry = (h, stamp)


def _check_kv_cache(md: BatchMetadata, s_lens: Sequence[int], q_lens: Sequence[int], slot_list: Sequence[int],
                    rows: Sequence[Sequence[int]], num_blocks: int, bs: int, where: str) -> None:
    """Block size, table coverage, block ids and slots against one KV-cache geometry."""
    if md.block_size is not None and md.block_size != bs:
        raise ValueError(f"{where}its KV cache has block size {bs}, but the batch metadata was built for "
                         f"block_size={md.block_size}")
    width = len(rows[0]) if rows else 0
    check_block_coverage(s_lens, [width] * len(s_lens), bs, where)
    for i, s in enumerate(s_lens):
        for j in range(-(-s // bs)):
            if not 0 <= rows[i][j] < num_blocks:
                raise ValueError(f"{where}block_table[{i}, {j}] is block {rows[i][j]}, out of range; its KV cache "
                                 f"has blocks [0, {num_blocks})")
    num_slots = num_blocks * bs
    if slot_list and max(slot_list) >= num_slots:
        i = max(range(len(slot_list)), key=slot_list.__getitem__)
        raise ValueError(f"{where}slot_mapping[{i}]={slot_list[i]} is out of range; its KV cache has slots "
                         f"[0, {num_slots}) ({num_blocks} blocks of {bs})")
    if md.block_size is None:
        check_slots_against_table(slot_list, q_lens, s_lens, rows, bs, where)


def _check_state_slots(idx: list[int], states: dict[int, str]) -> None:
    """Every state slot in range of every state cache, and no slot shared."""
    for num_slots, name in sorted(states.items()):
        bad = [i for i in idx if not 0 <= i < num_slots]
        if bad:
            raise ValueError(f"linear_attention: layer {name!r}: state_indices {bad} out of range; the state cache "
                             f"has slots [0, {num_slots})")
    if states and len(set(idx)) != len(idx):
        raise ValueError(f"linear_attention: state_indices {idx} repeat a slot; every request needs its own slot")


def _cache_geometries(registry: LayerRegistry) -> tuple[dict[tuple[int, int], str], dict[int, str]]:
    """``(num_blocks, block_size) -> first layer name`` over the registry's paged KV caches, and
    ``num_state_slots -> first layer name`` over its recurrent state caches. The caches' shapes are
    read each time (a layer's cache may be replaced); which layers hold one, the registry remembers."""
    kv: dict[tuple[int, int], str] = {}
    states: dict[int, str] = {}
    for name, layer in registry.layers_with_tensor(CACHE_ATTRS):
        cache = getattr(layer, "kv_cache", None)
        if isinstance(cache, torch.Tensor) and cache.dim() == 5:
            kv.setdefault((int(cache.shape[1]), int(cache.shape[2])), name)
        state = getattr(layer, "state_cache", None)
        if isinstance(state, torch.Tensor) and state.dim() >= 1:
            states.setdefault(int(state.shape[0]), name)
    return kv, states
