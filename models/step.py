"""``make_step``: a decode-first batch for a zoo model, runnable eager or compiled.

Decode requests need history: ``make_step`` draws random history tokens, allocates KV blocks
and a recurrent-state slot per request, and prefills the history by running the model
eagerly. Then the step is: one new token per decode, then the prefills' prompts.

Re-running is safe: the KV write of a step goes to the same slots with the same values, and
recurrent state (any registered layer's ``state_cache``, rows indexed by state slot) is
restored to its post-history snapshot before every run.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from layerpass.ops import BatchMetadata, build_batch_metadata, host_values, set_forward_context
from layerpass.ops.batch_checks import check_int, check_ints

STATE_ATTR = "state_cache"  # recurrent layers keep [num_state_slots, ...] here (ops/linear_attention.py)


@dataclass(frozen=True)
class Request:
    history: tuple[int, ...]  # tokens already in the KV cache / state when the step runs
    tokens: tuple[int, ...]  # this step's query tokens
    blocks: tuple[int, ...]
    state_slot: int

    @property
    def is_decode(self) -> bool:
        return len(self.tokens) == 1 and len(self.history) > 0


def _state_tensors(model: nn.Module) -> list[torch.Tensor]:
    registry = model.layer_registry
    out = []
    for name in sorted(registry.names()):
        layer = registry.get(name)
        t = getattr(layer, STATE_ATTR, None)
        if isinstance(t, torch.Tensor):
            out.append(t)
    return out


def _metadata(requests: Sequence[Request], block_size: int, *, history: bool) -> BatchMetadata:
    if history:
        query = [len(r.history) for r in requests]
        context = [0] * len(requests)
    else:
        query = [len(r.tokens) for r in requests]
        context = [len(r.history) for r in requests]
    return build_batch_metadata(query, context, [r.blocks for r in requests], block_size,
                                state_indices=[r.state_slot for r in requests])


def _inputs(requests: Sequence[Request], *, history: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ids, pos = [], []
    for r in requests:
        toks = r.history if history else r.tokens
        start = 0 if history else len(r.history)
        ids.extend(toks)
        pos.extend(range(start, start + len(toks)))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(pos, dtype=torch.long)


class Step:
    """One batch: ``input_ids``, ``positions``, ``metadata``, ``requests``; ``run(fn)`` executes it."""

    def __init__(self, model: nn.Module, requests: Sequence[Request], snapshot: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        self.model = model
        self.requests = tuple(requests)
        self.input_ids, self.positions = _inputs(self.requests, history=False)
        self.metadata = _metadata(self.requests, model.cache_config.block_size, history=False)
        self._snapshot = snapshot  # (state tensor, slot rows, saved rows)

    @property
    def num_decodes(self) -> int:
        return self.metadata.num_decodes

    def restore_state(self) -> None:
        """Put every recurrent-state row of this step back to its value after the history prefill."""
        for tensor, rows, saved in self._snapshot:
            tensor[rows] = saved

    def run(self, fn: Callable[[torch.Tensor, torch.Tensor], Any] | None = None) -> Any:
        """``fn(input_ids, positions)`` (default: the model) inside the step's forward context.

        ``fn`` may be the step's model, its bound ``forward``, ``layerpass.compile(model)`` or
        ``torch.compile(model)``; any other model is refused (``ValueError``): the layer registry,
        KV cache and recurrent state the ops use come from the step's model. A plain function is run
        as given (what it calls cannot be checked)."""
        if fn is not None:
            self._check_model(fn)
        self.restore_state()
        with torch.no_grad(), set_forward_context(self.metadata, self.model.layer_registry):
            return (self.model if fn is None else fn)(self.input_ids, self.positions)

    def _check_model(self, fn: Any) -> None:
        found = _underlying_model(fn)
        if found is None or found is self.model:
            return
        if getattr(found, "layer_registry", None) is self.model.layer_registry:
            return  # a module sharing the step's registry (e.g. a wrapper holding the model)
        label = getattr(getattr(found, "layer_registry", None), "label", None)
        raise ValueError(
            f"Step.run: {type(found).__name__}"
            + (f" (layer registry {label!r})" if label is not None else "")
            + f" is not the model this step was made for ({type(self.model).__name__}, layer registry "
            f"{self.model.layer_registry.label!r}): the step's batch runs against its own model's registry, KV "
            f"cache and state; make a step for the other model with make_step(model, ...)"
        )

    def split(self, logits: torch.Tensor) -> list[torch.Tensor]:
        """Per-request rows of a ``[T, ...]`` step output."""
        qsl = host_values(self.metadata).query_start_loc  # the host values: no device read
        return [logits[a:b] for a, b in zip(qsl[:-1], qsl[1:])]

    def alone(self) -> list["Step"]:
        """One step per request with the same tokens, history, blocks and state slot."""
        return [_SubStep(self, r) for r in self.requests]

    def release(self) -> None:
        """Give the blocks and state slots back to the model's allocators (idempotent)."""
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()


def _underlying_model(fn: Any) -> nn.Module | None:
    """The registry-bearing model behind ``fn``: itself, a bound method's module, a
    ``torch.compile`` wrapper's ``_orig_mod`` or a ``layerpass.compile`` result's ``model``;
    ``None`` for a callable that holds no model (a plain function)."""
    obj = getattr(fn, "__self__", None) if inspect.ismethod(fn) else fn
    for _ in range(8):  # a few wrappers deep at most
        if not isinstance(obj, nn.Module):
            return None
        if hasattr(obj, "layer_registry"):
            return obj
        inner = getattr(obj, "_orig_mod", None)  # torch.compile's OptimizedModule
        if not isinstance(inner, nn.Module):
            inner = getattr(obj, "model", None)  # layerpass.compile's CompiledModel
        if not isinstance(inner, nn.Module):
            return None
        obj = inner
    return None


class _SubStep(Step):
    def __init__(self, parent: Step, request: Request) -> None:
        super().__init__(parent.model, [request], parent._snapshot)
        self.parent = parent  # keeps the parent's blocks alive


def _free(model_ref: "weakref.ref[nn.Module]", blocks: list[int], slots: list[int]) -> None:
    model = model_ref()
    if model is not None:
        model.block_allocator.free(blocks)
        model.state_allocator.free(slots)


def make_step(
    model: nn.Module,
    *,
    num_decodes: int,
    prefill_lens: Sequence[int],
    seed: int = 0,
    history_lens: Sequence[int] | None = None,
    max_history: int = 40,
) -> Step:
    """Build (and prefill the history of) a decode-first step for a ``build_model`` model.

    ``history_lens`` (one per decode) defaults to random lengths in ``[1, max_history]``."""
    for attr in ("layer_registry", "cache_config", "block_allocator", "state_allocator", "config"):
        if not hasattr(model, attr):
            raise TypeError(f"make_step needs a model from layerpass.models.build_model (missing {attr!r})")
    num_decodes = check_int("num_decodes", num_decodes, 0, "make_step: ")
    prefill_lens = check_ints("prefill_lens", prefill_lens, 1, "make_step: ")
    if num_decodes + len(prefill_lens) == 0:
        raise ValueError(f"make_step needs at least one request; got num_decodes={num_decodes}, "
                         f"prefill_lens={prefill_lens}")
    check_int("seed", seed, None, "make_step: ")
    check_int("max_history", max_history, 1, "make_step: ")
    g = torch.Generator().manual_seed(seed)
    if history_lens is None:
        history_lens = torch.randint(1, max_history + 1, (num_decodes,), generator=g).tolist()
    history_lens = check_ints("history_lens", history_lens, 1, "make_step: ")
    if len(history_lens) != num_decodes:
        raise ValueError(f"history_lens needs {num_decodes} lengths >= 1, got {list(history_lens)}")
    bs = model.cache_config.block_size
    shapes = [(h, 1) for h in history_lens] + [(0, n) for n in prefill_lens]
    for h, q in shapes:
        if h + q > model.config.max_position:
            raise ValueError(f"request of {h + q} tokens exceeds max_position {model.config.max_position}")
    slots = model.state_allocator.allocate(len(shapes))
    blocks: list[int] = []
    try:  # from here on, a failure gives back what was taken
        blocks = model.block_allocator.allocate(sum(-(-(h + q) // bs) for h, q in shapes))
        step = _build_step(model, num_decodes, shapes, slots, blocks, g)
    except BaseException:
        model.block_allocator.free(blocks)
        model.state_allocator.free(slots)
        raise
    step._finalizer = weakref.finalize(step, _free, weakref.ref(model), blocks, slots)
    return step


def _build_step(model: nn.Module, num_decodes: int, shapes: list[tuple[int, int]], slots: list[int],
                blocks: list[int], g: torch.Generator) -> Step:
    """The step's requests on the allocated blocks and slots, the decodes' history prefilled."""
    vocab, bs = model.config.vocab_size, model.cache_config.block_size
    requests, used = [], 0
    for (h, q), slot in zip(shapes, slots):
        nb = -(-(h + q) // bs)
        toks = torch.randint(0, vocab, (h + q,), generator=g).tolist()
        requests.append(Request(tuple(toks[:h]), tuple(toks[h:]), tuple(blocks[used : used + nb]), slot))
        used += nb

    decodes = requests[:num_decodes]
    if decodes:  # prefill the decodes' history (every one a fresh prefill from an empty slot)
        ids, pos = _inputs(decodes, history=True)
        with torch.no_grad(), set_forward_context(_metadata(decodes, bs, history=True), model.layer_registry):
            model(ids, pos)
    rows = torch.tensor(slots, dtype=torch.long)
    snapshot = [(t, rows, t[rows].clone()) for t in _state_tensors(model)]
    return Step(model, requests, snapshot)
