"""Which dims of a layer's inputs are the step's token count: the one rule, for regions, the
whole-model path and the doctor (marked unbacked before a trace, so no token count recompiles)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree  # no public pytree in torch 2.13 (torch.utils.pytree is newer)

TOKEN_SHAPE_ID = "layerpass_tokens"

# The layouts whose rows are tokens: input_ids / positions [T], a layer's [T, H], HF's [1, T, H].
MAX_TOKEN_LAYOUT_DIMS = 3


def token_dims(t: torch.Tensor, tokens: int | None) -> list[int]:
    """The one rule for which dims of a tensor are the step's token count (marked dynamic).

    Only tensors in a token layout (``[T]``, ``[T, H]``, ``[1, T, H]``: at most 3 dims) have one:
    dim 0 when the count is unknown (the zoo's layout), else each dim of that size. A tensor of
    4 or more dims is never marked: an image batch ``[N, C, H, W]`` is no token count, and
    Inductor cannot order the strides of such a tensor with an unbacked size (it takes a
    contiguous conv input for channels-last: ``assert_size_stride`` fails at run time)."""
    if t.dim() == 0 or t.dim() > MAX_TOKEN_LAYOUT_DIMS:
        return []
    return [0] if tokens is None else [d for d, n in enumerate(t.shape) if n == tokens]


def mark_token_dims_of(args: tuple[Any, ...], kwargs: dict[str, Any], tokens: int | None,
                       backed: bool = False) -> None:
    """Mark the token dims of a layer's tensor inputs unbacked before tracing it.

    ``backed``: dynamic but backed instead (``maybe_mark_dynamic``), for a layer whose trace with
    an unbacked count fails (it branches on the count): each branch is then a guard of the region
    (a count on the other side traces one more region), not a data-dependent error or graph break.

    The token dims are those of the step's token count (``[T, H]``, HF's ``[1, T, H]``, ...);
    with one token the count is ambiguous, so nothing is marked and the region is specialised
    to one token (a later multi-token step traces a dynamic region, and both are kept).
    Unknown count: dim 0 of every tensor, the zoo's layout. Which tensors: ``token_dims``."""
    if tokens is not None and tokens <= 1:
        return
    for leaf in pytree.tree_leaves((args, kwargs)):
        if not isinstance(leaf, torch.Tensor):
            continue
        for i, d in enumerate(token_dims(leaf, tokens)):
            # each tensor's first token dim is the ONE token symbol (shape_id): the layer's input and
            # residual are then provably the same size, so residual ops can be lowered; a later dim
            # of the same size may be a coincidence (hidden == tokens) and stays a symbol of its own
            if backed:  # backed sizes of one value are one symbol anyway (duck sizing, guarded)
                torch._dynamo.maybe_mark_dynamic(leaf, d)
                continue
            shared = {"shape_id": TOKEN_SHAPE_ID} if i == 0 and tokens is not None else {}
            torch._dynamo.decorators.mark_unbacked(leaf, d, **shared)
