"""``BatchMetadata``: one decode-first batch, its host values (``HostMetadata``) and its validation.

Batches are ordered decode-first: the ``num_decodes`` decode requests (one query token
each) come first, then ``num_prefills`` prefill requests. Linear-attention state slots
follow the same order.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from .batch_checks import check_request_lengths, check_slots_against_table, query_lens_of


@dataclass(frozen=True)
class HostMetadata:
    """The host-side (Python int) values of a ``BatchMetadata``'s index tensors: what the metadata
    was built from. Validation and the per-step registry check read these, never the tensors, so a
    step on a GPU does not wait on the device (``build_batch_metadata`` always fills them in).

    They must equal the tensors' values (they are trusted: checking would read the tensors). A
    ``HostMetadata`` describes the tensors of the first ``BatchMetadata`` it is given to; one whose
    tensors are later replaced (``setattr``, ``dataclasses.replace``) or modified in place (their
    version counter moves) is stale, and the values are then read from the tensors again (free on
    CPU, a device read elsewhere): pass fresh host values with new or rewritten tensors."""

    query_start_loc: tuple[int, ...]
    seq_lens: tuple[int, ...]
    slot_mapping: tuple[int, ...]
    block_table: tuple[tuple[int, ...], ...]  # every row, padding included, as in the tensor
    state_indices: tuple[int, ...] | None = None
    # (weakref or None per tensor, versions): the tensors described; set once, when first bound
    _bound: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_tensors(cls, md: "BatchMetadata") -> "HostMetadata":
        """Read the values from ``md``'s tensors (a device read off-CPU)."""
        idx = md.state_indices
        return cls(tuple(md.query_start_loc.tolist()), tuple(md.seq_lens.tolist()), tuple(md.slot_mapping.tolist()),
                   tuple(tuple(r) for r in md.block_table.tolist()), None if idx is None else tuple(idx.tolist()))

    def _describes(self, tensors: tuple) -> bool:
        bound = self._bound
        return bound is not None and all(
            (r is None and t is None) or (r is not None and r() is t) for r, t in zip(bound[0], tensors)
        ) and bound[1] == _versions(tensors)

    def __reduce__(self):  # a copy (pickle, deepcopy) is unbound: it describes its BatchMetadata's copied tensors
        return (type(self), (self.query_start_loc, self.seq_lens, self.slot_mapping, self.block_table, self.state_indices))

    def _bind(self, tensors: tuple) -> None:
        object.__setattr__(self, "_bound", (tuple(None if t is None else weakref.ref(t) for t in tensors),
                                            _versions(tensors)))


def _index_tensors(md: "BatchMetadata") -> tuple:
    """The tensors a ``HostMetadata`` describes, in its field order."""
    return md.query_start_loc, md.seq_lens, md.slot_mapping, md.block_table, md.state_indices


def _versions(tensors: tuple) -> tuple:
    out = []
    for t in tensors:
        try:
            out.append(None if t is None else t._version)
        except RuntimeError:  # an inference tensor has no version counter: identity only
            out.append(None)
    return tuple(out)


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
    - ``host``: the same index values as Python ints (``HostMetadata``), what the metadata was
      built from; ``build_batch_metadata`` fills it in. Without it they are read from the tensors
      once, at construction (free on CPU; a device read elsewhere), and kept here.

    Validated when constructed (``validate_batch_metadata``, the one path ``build_batch_metadata``
    also goes through): counts, shapes and dtypes agree, every query length is >= 1 (1 for a
    decode), ``seq_lens >= query lengths``, slots are >= 0 and distinct, state slots distinct.
    The values come from ``host``: a step never reads a metadata tensor back to the host.
    ``set_forward_context(metadata, registry)`` further checks it against the registry's KV caches
    and state caches, from the same host values.
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
    host: HostMetadata | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        # What the last check against a registry's caches passed (``check_metadata_for_registry``):
        # the host values and cache geometries it saw, so a step re-run with the same metadata is not
        # checked again. A plain attribute, not a field: no part of eq / repr / replace.
        self.checked_for_registry: tuple[HostMetadata, Hashable] | None = None
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


def _is_real(t: torch.Tensor) -> bool:
    """A tensor whose values can be read (not fake / meta, and not while tracing)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return not isinstance(t, FakeTensor) and t.device.type != "meta" and not torch.compiler.is_compiling()


def _readable(md: BatchMetadata) -> bool:
    """Whether the index tensors' values can be read at all: tensors of the right rank (else the
    shape checks raise), real, outside tracing."""
    tensors = _index_tensors(md)
    if not all(isinstance(t, torch.Tensor) and t.dim() == (2 if i == 3 else 1)
               for i, t in enumerate(tensors) if t is not None or i < 4):
        return False
    return all(_is_real(t) for t in tensors if t is not None)


def _check_host_shapes(h: HostMetadata, md: BatchMetadata) -> None:
    """The host values have the tensors' shapes (no tensor is read; a field that is not a tensor
    of the right rank is left to the tensor checks)."""
    for name, values, t in (("query_start_loc", h.query_start_loc, md.query_start_loc), ("seq_lens", h.seq_lens, md.seq_lens),
                            ("slot_mapping", h.slot_mapping, md.slot_mapping), ("state_indices", h.state_indices, md.state_indices)):
        if t is not None and not (isinstance(t, torch.Tensor) and t.dim() == 1):
            continue
        n = None if values is None else len(values)
        want = None if t is None else t.shape[0]
        if n != want:
            raise ValueError(f"BatchMetadata.host.{name} has {n} values, the tensor {want}: host must hold the "
                             f"tensors' values")
    table = md.block_table
    if isinstance(table, torch.Tensor) and table.dim() == 2 and (
            len(h.block_table) != table.shape[0] or any(len(r) != table.shape[1] for r in h.block_table)):
        raise ValueError(f"BatchMetadata.host.block_table must have the tensor's shape {list(table.shape)} "
                         f"(every row, padding included)")


def host_values(md: BatchMetadata) -> HostMetadata | None:
    """``md``'s index values on the host: its ``host`` while that describes its current tensors (not
    replaced nor modified in place since), else read from the tensors again and kept (free on CPU;
    elsewhere a device read, only after such a change); ``None`` while they cannot be read (fake or
    meta tensors, tracing)."""
    tensors = _index_tensors(md)
    h = md.host
    if h is not None:
        if h._describes(tensors):
            return h
        if h._bound is None:  # given with these tensors: it describes them from now on
            _check_host_shapes(h, md)
            h._bind(tensors)
            return h
    if not _readable(md):
        md.host = None  # stale (or absent), and nothing to read
        return None
    h = HostMetadata.from_tensors(md)
    h._bind(tensors)
    md.host = h
    return h


# ---------------------------------------------------------------- validation
_INT_DTYPES = (torch.int32, torch.int64)


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


def validate_batch_metadata(md: BatchMetadata) -> None:
    """Every invariant of one decode-first batch; ``ValueError`` naming the field and what is allowed.

    Shapes and dtypes are always checked; values from the host values (``host_values``), never
    by reading a tensor that has them."""
    nd = _check_count("num_decodes", md.num_decodes)
    ndt = _check_count("num_decode_tokens", md.num_decode_tokens)
    npf = _check_count("num_prefills", md.num_prefills)
    npt = _check_count("num_prefill_tokens", md.num_prefill_tokens)
    if ndt != nd:
        raise ValueError(f"BatchMetadata.num_decode_tokens={ndt} must equal num_decodes={nd} (one token per decode)")
    if md.block_size is not None and (isinstance(md.block_size, bool) or not isinstance(md.block_size, int)
                                      or md.block_size < 1):
        raise ValueError(f"BatchMetadata.block_size must be a positive int or None, got {md.block_size!r}")
    if md.host is not None and not isinstance(md.host, HostMetadata):
        raise ValueError(f"BatchMetadata.host must be a HostMetadata or None, got {type(md.host).__name__}")
    n, t = nd + npf, ndt + npt
    _check_tensor("query_start_loc", md.query_start_loc, (n + 1,), _INT_DTYPES,
                  f"int32 [num_reqs + 1] = [{n + 1}] query offsets; query_start_loc must be an integer tensor")
    _check_tensor("seq_lens", md.seq_lens, (n,), _INT_DTYPES, f"int32 [num_reqs] = [{n}]")
    h = host_values(md)
    if h is not None:
        starts = list(h.query_start_loc)
        if starts[0] != 0:
            raise ValueError(f"BatchMetadata.query_start_loc[0] must be 0, got {starts}")
        q_lens = query_lens_of(starts)
        s_lens = list(h.seq_lens)
        check_request_lengths(q_lens, s_lens, nd)
        if starts[-1] != t or sum(q_lens[nd:]) != npt:
            raise ValueError(f"BatchMetadata.query_start_loc {starts} holds {starts[-1]} tokens, "
                             f"{sum(q_lens[nd:])} prefill tokens; num_decode_tokens={ndt} and num_prefill_tokens={npt} "
                             f"say {t} and {npt}")
    _check_tensor("slot_mapping", md.slot_mapping, (t,), (torch.int64,),
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
    if h is None:
        return
    _check_distinct_slots(h)
    if md.block_size is not None:
        check_slots_against_table(h.slot_mapping, q_lens, s_lens, h.block_table, md.block_size)


def _check_distinct_slots(h: HostMetadata) -> None:
    """KV slots and state slots are >= 0, and no two tokens (requests) share one."""
    slot_list = h.slot_mapping
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
    if h.state_indices is not None:
        idx = h.state_indices
        for i, s in enumerate(idx):
            if s < 0:
                raise ValueError(f"BatchMetadata.state_indices[{i}]={s}; state slots are >= 0")
        if len(set(idx)) != len(idx):
            raise ValueError(f"BatchMetadata.state_indices {list(idx)} repeat a slot; every request needs its own "
                             f"state slot")
