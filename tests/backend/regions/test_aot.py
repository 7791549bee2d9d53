"""``backend/regions/aot.py``: the fast argument binding before a region's guard check binds exactly as
``inspect.Signature.bind`` + ``apply_defaults`` do (same locals, same errors), for the forward
signatures layers have: plain parameters, defaults, keyword-only ones, and a trailing
``**kwargs`` (Hugging Face decoder layers)."""

from __future__ import annotations

import inspect
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from layerpass.backend.regions.aot import ArgBinder


def _plain(self, x, y=2):  # noqa: ANN001, ANN202
    pass


def _required(self, x, y):  # noqa: ANN001, ANN202
    pass


def _keyword_only(self, x, y=2, *, z=3):  # noqa: ANN001, ANN202
    pass


def _hf_style(self, hidden, mask=None, position_ids=None, use_cache=False, **kwargs):  # noqa: ANN001, ANN003, ANN202
    pass


def _positional_only(self, x, /, y=1, **kwargs):  # noqa: ANN001, ANN003, ANN202
    pass


def _wrapper(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202  (transformers' checkpointing wrapper)
    pass


def _head_and_star(self, x, y=0, *rest):  # noqa: ANN001, ANN002, ANN202
    pass


FORWARDS = [_plain, _required, _keyword_only, _hf_style, _positional_only, _wrapper, _head_and_star]
NAMES = ["x", "y", "z", "hidden", "mask", "position_ids", "use_cache", "extra", "self", "args", "kwargs", "rest"]


def _inspect_bind(fn: Any, args: tuple, kwargs: dict) -> Any:
    try:
        bound = inspect.signature(fn).bind("layer", *args, **kwargs)
    except TypeError as e:
        return TypeError, str(e)
    bound.apply_defaults()
    return dict(bound.arguments)


def _fast_bind(fn: Any, args: tuple, kwargs: dict) -> Any:
    try:
        return ArgBinder(inspect.signature(fn)).bind("layer", args, kwargs)
    except TypeError as e:
        return TypeError, str(e)


@settings(max_examples=300, deadline=None)
@given(fn=st.sampled_from(FORWARDS), num_args=st.integers(0, 4),
       kwargs=st.dictionaries(st.sampled_from(NAMES), st.integers(), max_size=4))
def test_binds_as_inspect_does(fn: Any, num_args: int, kwargs: dict) -> None:
    args = tuple(range(100, 100 + num_args))
    assert _fast_bind(fn, args, kwargs) == _inspect_bind(fn, args, kwargs)


def test_hf_style_forward_binds_without_inspect(monkeypatch) -> None:
    """The common calls of a decoder layer never reach ``inspect`` (its per-call cost is the point)."""
    binder = ArgBinder(inspect.signature(_hf_style))
    wrapper = ArgBinder(inspect.signature(_wrapper))
    calls = []
    real_bind = inspect.Signature.bind
    monkeypatch.setattr(inspect.Signature, "bind", lambda *a, **k: calls.append(1) or real_bind(*a, **k))
    bound = binder.bind("layer", ("h",), {"mask": None, "position_embeddings": (1, 2), "use_cache": True})
    assert bound == {"self": "layer", "hidden": "h", "mask": None, "position_ids": None, "use_cache": True,
                     "kwargs": {"position_embeddings": (1, 2)}}
    assert wrapper.bind("layer", ("h",), {"mask": None}) == {"self": "layer", "args": ("h",), "kwargs": {"mask": None}}
    assert calls == []
