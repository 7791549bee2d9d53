"""The per-step forward context: batch metadata every op of the step reads.

Batches are ordered decode-first: the ``num_decodes`` decode requests (one query token
each) come first, then ``num_prefills`` prefill requests. Linear-attention state slots
follow the same order.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .state import LayerRegistry


@dataclass
class BatchMetadata:
    """Metadata of one decode-first batch of ``num_reqs = num_decodes + num_prefills`` requests.

    - ``query_start_loc``: int32 ``[num_reqs + 1]``, offsets of each request's query tokens.
    - ``seq_lens``: int32 ``[num_reqs]``, each request's total length after this step.
    - ``slot_mapping``: int64 ``[num_tokens]``, the KV-cache slot each new token is written to.
    - ``block_table``: int32 ``[num_reqs, max_blocks]``, KV-cache blocks of each request.
    - ``state_indices``: int64 ``[num_reqs]``, recurrent-state slot of each request.
    - ``has_initial_state``: bool ``[num_reqs]``, whether that slot holds a previous state.
    """

    num_decodes: int
    num_decode_tokens: int
    num_prefills: int
    num_prefill_tokens: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    slot_mapping: torch.Tensor
    block_table: torch.Tensor
    state_indices: torch.Tensor | None = None
    has_initial_state: torch.Tensor | None = None

    @property
    def num_reqs(self) -> int:
        return self.num_decodes + self.num_prefills

    @property
    def num_tokens(self) -> int:
        return self.num_decode_tokens + self.num_prefill_tokens

    @property
    def query_lens(self) -> torch.Tensor:
        return self.query_start_loc[1:] - self.query_start_loc[:-1]

    @property
    def context_lens(self) -> torch.Tensor:
        return self.seq_lens - self.query_lens


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
    n = len(query_lens)
    if not (len(context_lens) == len(block_tables) == n):
        raise ValueError(
            f"query_lens, context_lens and block_tables need one entry per request; got "
            f"{len(query_lens)}, {len(context_lens)}, {len(block_tables)}"
        )
    if any(q < 1 for q in query_lens) or any(c < 0 for c in context_lens):
        raise ValueError(f"query lengths must be >= 1 and context lengths >= 0: {query_lens}, {context_lens}")
    is_decode = [q == 1 and c > 0 for q, c in zip(query_lens, context_lens)]
    num_decodes = 0
    while num_decodes < n and is_decode[num_decodes]:
        num_decodes += 1
    if any(is_decode[num_decodes:]):
        raise ValueError(
            f"batch is not decode-first: decode requests (query_len 1 with history) must all "
            f"precede prefills; got decode flags {is_decode}"
        )
    seq_lens = [q + c for q, c in zip(query_lens, context_lens)]
    for i, (s, bt) in enumerate(zip(seq_lens, block_tables)):
        if len(bt) * block_size < s:
            raise ValueError(f"request {i} needs {s} KV slots but its block table holds {len(bt) * block_size}")
    max_blocks = max([len(bt) for bt in block_tables] + [1])
    table = torch.zeros(n, max_blocks, dtype=torch.int32)
    for i, bt in enumerate(block_tables):
        table[i, : len(bt)] = torch.tensor(list(bt), dtype=torch.int32)
    slots = []
    for i, (q, c) in enumerate(zip(query_lens, context_lens)):
        pos = torch.arange(c, c + q)
        slots.append(table[i, pos // block_size].long() * block_size + pos % block_size)
    qsl = torch.zeros(n + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(list(query_lens), dtype=torch.int32), 0)
    return BatchMetadata(
        num_decodes=num_decodes,
        num_decode_tokens=num_decodes,
        num_prefills=n - num_decodes,
        num_prefill_tokens=int(sum(query_lens[num_decodes:])),
        query_start_loc=qsl.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        slot_mapping=(torch.cat(slots) if slots else torch.zeros(0, dtype=torch.long)).to(device),
        block_table=table.to(device),
        state_indices=None if state_indices is None else torch.tensor(list(state_indices), dtype=torch.long, device=device),
        has_initial_state=torch.tensor([c > 0 for c in context_lens], dtype=torch.bool, device=device),
    )


@dataclass
class ForwardContext:
    metadata: BatchMetadata | None
    registry: LayerRegistry | None


_forward_context: contextvars.ContextVar[ForwardContext | None] = contextvars.ContextVar(
    "layerpass_forward_context", default=None
)


@contextlib.contextmanager
def set_forward_context(
    metadata: BatchMetadata | None, registry: LayerRegistry | None = None
) -> Iterator[ForwardContext]:
    """Make ``metadata`` (and the model's layer ``registry``) visible to the ops of one step."""
    ctx = ForwardContext(metadata, registry)
    token = _forward_context.set(ctx)
    try:
        yield ctx
    finally:
        _forward_context.reset(token)


def current_forward_context() -> ForwardContext | None:
    return _forward_context.get()


def get_batch_metadata() -> BatchMetadata:
    """The step's batch metadata; raises if an op runs outside ``set_forward_context``."""
    ctx = _forward_context.get()
    if ctx is None or ctx.metadata is None:
        raise RuntimeError(
            "no batch metadata: run the model inside `with set_forward_context(metadata, registry):` "
            "(or use models.make_step(...).run(fn))"
        )
    return ctx.metadata
