"""``build_batch_metadata``: a decode-first ``BatchMetadata`` from per-request lengths and blocks."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .batch_checks import check_block_coverage, check_ints, check_request_lengths
from .batch_metadata import BatchMetadata, HostMetadata


def build_batch_metadata(
    query_lens: Sequence[int],
    context_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    state_indices: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
) -> BatchMetadata:
    """Build decode-first metadata. Requests with ``query_len == 1`` and a non-empty
    context are decodes and must all come before the prefills."""
    query_lens, context_lens = check_ints("query_lens", query_lens), check_ints("context_lens", context_lens)
    if isinstance(block_tables, (str, bytes)) or not isinstance(block_tables, Sequence):
        raise ValueError(f"block_tables must be a sequence of block-id lists, got {type(block_tables).__name__}")
    block_tables = [check_ints(f"block_tables[{i}]", bt) for i, bt in enumerate(block_tables)]
    if state_indices is not None:
        state_indices = check_ints("state_indices", state_indices)
    n = len(query_lens)
    if not (len(context_lens) == len(block_tables) == n):
        raise ValueError(
            f"query_lens, context_lens and block_tables need one entry per request; got "
            f"{len(query_lens)}, {len(context_lens)}, {len(block_tables)}"
        )
    check_request_lengths(query_lens, [q + c for q, c in zip(query_lens, context_lens)])
    is_decode = [q == 1 and c > 0 for q, c in zip(query_lens, context_lens)]
    num_decodes = 0
    while num_decodes < n and is_decode[num_decodes]:
        num_decodes += 1
    if any(is_decode[num_decodes:]):
        raise ValueError(
            f"batch is not decode-first: decode requests (query_len 1 with history) must all "
            f"precede prefills; got decode flags {is_decode}"
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    seq_lens = [q + c for q, c in zip(query_lens, context_lens)]
    check_block_coverage(seq_lens, [len(bt) for bt in block_tables], block_size)
    max_blocks = max([len(bt) for bt in block_tables] + [1])
    # the host values first (what the tensors are made from, and what validation reads)
    rows = tuple(tuple(int(b) for b in bt) + (0,) * (max_blocks - len(bt)) for bt in block_tables)
    slots = tuple(rows[i][p // block_size] * block_size + p % block_size
                  for i, (q, c) in enumerate(zip(query_lens, context_lens)) for p in range(c, c + q))
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + int(q))
    states = None if state_indices is None else tuple(int(s) for s in state_indices)
    host = HostMetadata(tuple(starts), tuple(int(s) for s in seq_lens), slots, rows, states)
    return BatchMetadata(
        num_decodes=num_decodes,
        num_decode_tokens=num_decodes,
        num_prefills=n - num_decodes,
        num_prefill_tokens=int(sum(query_lens[num_decodes:])),
        query_start_loc=torch.tensor(host.query_start_loc, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(host.seq_lens, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        block_table=torch.tensor(rows, dtype=torch.int32, device=device).view(n, max_blocks),
        state_indices=None if states is None else torch.tensor(states, dtype=torch.long, device=device),
        has_initial_state=torch.tensor([c > 0 for c in context_lens], dtype=torch.bool, device=device),
        block_size=block_size,
        host=host,
    )  # validated by BatchMetadata itself: the one validation path
