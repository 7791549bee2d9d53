"""Invariants of a decode-first batch, on its host values (Python ints, never tensors).

Shared by the three places that check a batch: ``build_batch_metadata`` (before it makes the
tensors), ``validate_batch_metadata`` (every ``BatchMetadata``) and the per-step check against the
registry's caches (``check_metadata_for_registry``), so each invariant is written once and all
three raise the same ``ValueError``."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any


def check_int(name: str, value: Any, minimum: int | None = None, where: str = "") -> int:
    """``value`` as an int: an integer (not a bool), >= ``minimum`` when given; else ``ValueError``
    naming ``name``, the value and its type."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{where}{name} must be an int{bound}, got {value!r} ({type(value).__name__})")
    return int(value)


def check_ints(name: str, values: Any, minimum: int | None = None, where: str = "") -> list[int]:
    """``values`` as a list of ints: a sequence (not a str) of ``check_int`` values (``name[i]``)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{where}{name} must be a sequence of ints, got {type(values).__name__}")
    return [check_int(f"{name}[{i}]", v, minimum, where) for i, v in enumerate(values)]


def check_request_lengths(query_lens: Sequence[int], seq_lens: Sequence[int], num_decodes: int = 0) -> None:
    """Every query length >= 1 (exactly 1 for the first ``num_decodes`` requests) and every
    ``seq_len >= query_len`` (a context length >= 0)."""
    for i, (q, s) in enumerate(zip(query_lens, seq_lens)):
        if q < 1:
            raise ValueError(f"query lengths must be >= 1 (request {i} has {q} query tokens); query_start_loc must "
                             f"be strictly increasing")
        if i < num_decodes and q != 1:
            raise ValueError(f"decode request {i} has {q} query tokens; a decode has exactly 1 (decodes come first, "
                             f"num_decodes={num_decodes})")
        if s < q:
            raise ValueError(f"seq_lens[{i}]={s} is shorter than its query length {q}: seq_lens holds the total "
                             f"length after this step, context + query, and context lengths >= 0")


def check_block_coverage(seq_lens: Sequence[int], table_lens: Sequence[int], block_size: int, where: str = "") -> None:
    """Each request's blocks hold its whole sequence."""
    for i, (s, nb) in enumerate(zip(seq_lens, table_lens)):
        if nb * block_size < s:
            raise ValueError(f"{where}request {i} needs {s} KV slots but block_table holds {nb * block_size} "
                             f"for it ({nb} blocks of {block_size})")


def check_slots_against_table(slot_list: Sequence[int], q_lens: Sequence[int], s_lens: Sequence[int],
                              rows: Sequence[Sequence[int]], block_size: int, where: str = "BatchMetadata.") -> None:
    """The table (``rows``: its host values) covers every sequence, its used entries are >= 0, and
    each token's slot is the one the table gives its position."""
    width = len(rows[0]) if rows else 0
    check_block_coverage(s_lens, [width] * len(s_lens), block_size, where)
    tok = 0
    for i, (q, s) in enumerate(zip(q_lens, s_lens)):
        for j in range(-(-s // block_size)):
            if rows[i][j] < 0:
                raise ValueError(f"{where}block_table[{i}, {j}]={rows[i][j]} is a block of request {i}'s "
                                 f"{s} tokens; block ids are >= 0")
        for p in range(s - q, s):
            want = rows[i][p // block_size] * block_size + p % block_size
            if slot_list[tok] != want:
                raise ValueError(f"{where}slot_mapping[{tok}]={slot_list[tok]}, but the block table puts request "
                                 f"{i}'s position {p} at slot {want} (block_size={block_size})")
            tok += 1


def query_lens_of(starts: Sequence[int]) -> list[int]:
    """Each request's query length from the ``query_start_loc`` offsets."""
    return [b - a for a, b in zip(starts[:-1], starts[1:])]
