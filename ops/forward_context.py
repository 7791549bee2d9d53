"""The per-step forward context: batch metadata every op of the step reads.

Batches are ordered decode-first: the ``num_decodes`` decode requests (one query token
each) come first, then ``num_prefills`` prefill requests. Linear-attention state slots
follow the same order.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
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
    - ``block_size``: the KV-cache block size the slots were computed for, when known
      (``build_batch_metadata`` sets it); then ``slot_mapping`` must agree with ``block_table``.

    Validated when constructed (``validate_batch_metadata``, the one path ``build_batch_metadata``
    also goes through): counts, shapes and dtypes agree, every query length is >= 1 (1 for a
    decode), ``seq_lens >= query lengths``, slots are >= 0 and distinct, state slots distinct.
    This reads the tensors on the host: build metadata outside the compiled step (it always is).
    ``set_forward_context(metadata, registry)`` further checks it against the registry's KV caches.
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
    block_size: int | None = None

    def __post_init__(self) -> None:
        validate_batch_metadata(self)

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


_INT_DTYPES = (torch.int32, torch.int64)


def _is_real(t: torch.Tensor) -> bool:
    """A tensor whose values can be read (not fake / meta, and not while tracing)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return not isinstance(t, FakeTensor) and t.device.type != "meta" and not torch.compiler.is_compiling()


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"BatchMetadata.{name} must be an int >= 0, got {value!r}")
    return value


def _check_tensor(name: str, t: object, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...], what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"BatchMetadata.{name} must be a tensor ({what}), got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"BatchMetadata.{name} must be {allowed} ({what}), got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"BatchMetadata.{name} must have shape {list(shape)} ({what}), got {list(t.shape)}")
    return t


def check_request_lengths(query_lens: Sequence[int], seq_lens: Sequence[int], num_decodes: int = 0) -> None:
    """Every query length >= 1 (exactly 1 for the first ``num_decodes`` requests) and every
    ``seq_len >= query_len`` (a context length >= 0). Shared by the builder and the validator."""
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
    """Each request's blocks hold its whole sequence. Shared by the builder and the validator."""
    for i, (s, nb) in enumerate(zip(seq_lens, table_lens)):
        if nb * block_size < s:
            raise ValueError(f"{where}request {i} needs {s} KV slots but block_table holds {nb * block_size} "
                             f"for it ({nb} blocks of {block_size})")


def validate_batch_metadata(md: "BatchMetadata") -> None:
    """Every invariant of one decode-first batch; ``ValueError`` naming the field and what is allowed.

    Shapes and dtypes are always checked; values only on real tensors outside tracing."""
    nd = _check_count("num_decodes", md.num_decodes)
    ndt = _check_count("num_decode_tokens", md.num_decode_tokens)
    npf = _check_count("num_prefills", md.num_prefills)
    npt = _check_count("num_prefill_tokens", md.num_prefill_tokens)
    if ndt != nd:
        raise ValueError(f"BatchMetadata.num_decode_tokens={ndt} must equal num_decodes={nd} (one token per decode)")
    if md.block_size is not None and (isinstance(md.block_size, bool) or not isinstance(md.block_size, int)
                                      or md.block_size < 1):
        raise ValueError(f"BatchMetadata.block_size must be a positive int or None, got {md.block_size!r}")
    n, t = nd + npf, ndt + npt
    qsl = _check_tensor("query_start_loc", md.query_start_loc, (n + 1,), _INT_DTYPES,
                        f"int32 [num_reqs + 1] = [{n + 1}] query offsets; query_start_loc must be an integer tensor")
    seq = _check_tensor("seq_lens", md.seq_lens, (n,), _INT_DTYPES, f"int32 [num_reqs] = [{n}]")
    real = all(_is_real(x) for x in (qsl, seq))
    if real:
        starts = qsl.tolist()
        if starts[0] != 0:
            raise ValueError(f"BatchMetadata.query_start_loc[0] must be 0, got {starts}")
        q_lens = [b - a for a, b in zip(starts[:-1], starts[1:])]
        s_lens = seq.tolist()
        check_request_lengths(q_lens, s_lens, nd)
        if starts[-1] != t or sum(q_lens[nd:]) != npt:
            raise ValueError(f"BatchMetadata.query_start_loc {starts} holds {starts[-1]} tokens, "
                             f"{sum(q_lens[nd:])} prefill tokens; num_decode_tokens={ndt} and num_prefill_tokens={npt} "
                             f"say {t} and {npt}")
    slots = _check_tensor("slot_mapping", md.slot_mapping, (t,), (torch.int64,),
                          f"int64 [num_tokens] = [{t}] KV-cache slot per token; slot_mapping must be int64")
    table = md.block_table
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[0] != n or table.dtype not in _INT_DTYPES:
        got = f"{table.dtype} {list(table.shape)}" if isinstance(table, torch.Tensor) else type(table).__name__
        raise ValueError(f"BatchMetadata.block_table must be int32 [num_reqs, max_blocks] = [{n}, ...], got {got}")
    if md.state_indices is not None:
        _check_tensor("state_indices", md.state_indices, (n,), _INT_DTYPES, f"int64 [num_reqs] = [{n}]")
    if md.has_initial_state is not None:
        _check_tensor("has_initial_state", md.has_initial_state, (n,), (torch.bool,),
                      f"has_initial_state must be bool [num_reqs] = [{n}]")
    tensors = [x for x in (slots, table, md.state_indices, md.has_initial_state) if x is not None]
    if not real or not all(_is_real(x) for x in tensors):
        return
    slot_list = slots.tolist()
    for i, s in enumerate(slot_list):
        if s < 0:
            raise ValueError(f"BatchMetadata.slot_mapping[{i}]={s}; KV-cache slots are >= 0")
    if len(set(slot_list)) != len(slot_list):
        seen: dict[int, int] = {}
        for i, s in enumerate(slot_list):
            if s in seen:
                raise ValueError(f"BatchMetadata.slot_mapping puts tokens {seen[s]} and {i} on KV slot {s}: more "
                                 f"than one token per slot; every token needs its own slot")
            seen[s] = i
    if md.state_indices is not None:
        idx = md.state_indices.tolist()
        for i, s in enumerate(idx):
            if s < 0:
                raise ValueError(f"BatchMetadata.state_indices[{i}]={s}; state slots are >= 0")
        if len(set(idx)) != len(idx):
            raise ValueError(f"BatchMetadata.state_indices {idx} repeat a slot; every request needs its own state slot")
    if md.block_size is not None:
        _check_slots_against_table(slot_list, q_lens, s_lens, table, md.block_size)


def _check_slots_against_table(slot_list: list[int], q_lens: list[int], s_lens: list[int], table: torch.Tensor,
                               block_size: int, where: str = "BatchMetadata.") -> None:
    """The table covers every sequence, its used entries are >= 0, and each token's slot is the one
    the table gives its position."""
    check_block_coverage(s_lens, [table.shape[1]] * len(s_lens), block_size, where)
    rows = table.tolist()
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


def check_metadata_for_registry(md: "BatchMetadata", registry: LayerRegistry) -> None:
    """The batch fits the KV caches of the registry's attention layers (one check per cache geometry,
    naming the first layer with it): slots, block ids, block size, table coverage."""
    if md.num_reqs == 0 or not all(_is_real(x) for x in (md.slot_mapping, md.block_table, md.seq_lens)):
        return
    geometries = _kv_geometries(registry)
    if not geometries:
        return
    # once per (metadata contents, geometries): a step re-run with the same metadata is not re-checked
    stamp = (tuple((id(x), x._version) for x in (md.slot_mapping, md.block_table, md.seq_lens, md.query_start_loc)),
             md.block_size, frozenset(geometries))
    if md.__dict__.get("_checked_for") == stamp:
        return
    s_lens = md.seq_lens.tolist()
    starts = md.query_start_loc.tolist()
    q_lens = [b - a for a, b in zip(starts[:-1], starts[1:])]
    slot_list = md.slot_mapping.tolist()
    for (num_blocks, bs), name in sorted(geometries.items()):
        where = f"attention layer {name!r}: "
        if md.block_size is not None and md.block_size != bs:
            raise ValueError(f"{where}its KV cache has block size {bs}, but the batch metadata was built for "
                             f"block_size={md.block_size}")
        check_block_coverage(s_lens, [md.block_table.shape[1]] * len(s_lens), bs, where)
        rows = md.block_table.tolist()
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
            _check_slots_against_table(slot_list, q_lens, s_lens, md.block_table, bs, where)
    md.__dict__["_checked_for"] = stamp  # not a dataclass field: no effect on eq / repr / replace


def _kv_geometries(registry: LayerRegistry) -> dict[tuple[int, int], str]:
    """``(num_blocks, block_size) -> first layer name`` over the registry's paged KV caches. Which
    layers hold one is cached until the registry changes; their caches' shapes are read each time."""
    key = (registry.version, len(registry))
    cached = registry.__dict__.get("_kv_layers")
    if cached is None or cached[0] != key:
        layers = []
        for name in sorted(registry.names()):
            try:
                layer = registry.get(name)
            except KeyError:  # dropped meanwhile
                continue
            if isinstance(getattr(layer, "kv_cache", None), torch.Tensor):
                layers.append((name, weakref.ref(layer)))
        cached = (key, layers)
        registry.__dict__["_kv_layers"] = cached
    geometries: dict[tuple[int, int], str] = {}
    for name, ref in cached[1]:
        cache = getattr(ref(), "kv_cache", None)
        if isinstance(cache, torch.Tensor) and cache.dim() == 5:
            geometries.setdefault((int(cache.shape[1]), int(cache.shape[2])), name)
    return geometries


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
        block_size=block_size,
    )  # validated by BatchMetadata itself: the one validation path


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
    """Make ``metadata`` (and the model's layer ``registry``) visible to the ops of one step.

    With both given, the metadata is checked against the registry's KV caches here, once per step
    and outside the compiled code (slots, block ids, block size in range), so a bad batch is a
    ``ValueError`` naming the layer and the field instead of an ``IndexError`` inside an op."""
    if metadata is not None and registry is not None:
        check_metadata_for_registry(metadata, registry)
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
