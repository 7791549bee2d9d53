"""Where a compiled call's time goes: named spans (ISA probe, Dynamo, each piece's compile, saves,
loads) on one clock, for ``CompileReport.timeline``.

``CompiledModel`` opens a ``Timeline`` per call (``with timeline:``); the code that does the work marks
its spans with ``span(what)``, which costs nothing when no timeline is being recorded (a bare
``torch.compile(model, backend="layerpass")``). Times are seconds from the timeline's origin: the
``layerpass.compile`` call for a model's first call, the call itself afterwards.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Span:
    """One piece of work: ``what`` ran from ``start_s`` to ``end_s`` (seconds from the origin)."""

    what: str
    start_s: float
    end_s: float

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


class Timeline:
    """The spans of one compiled call, in the order they ended (nested spans end first); ``with
    timeline:`` makes it the one ``span`` records into, for the block."""

    def __init__(self, origin: float) -> None:
        self.origin = origin  # a time.perf_counter() value
        self.spans: list[Span] = []
        self._tokens: list[contextvars.Token[Timeline | None]] = []

    def __enter__(self) -> Timeline:
        self._tokens.append(_current.set(self))
        return self

    def __exit__(self, *exc: object) -> None:
        _current.reset(self._tokens.pop())

    def add(self, what: str, start: float, end: float) -> None:
        """Record a span given as two ``time.perf_counter()`` values."""
        self.spans.append(Span(what, start - self.origin, end - self.origin))


_current: contextvars.ContextVar[Timeline | None] = contextvars.ContextVar("layerpass_timeline", default=None)


@contextlib.contextmanager
def span(what: str) -> Iterator[None]:
    """Record this block as a span of the timeline being recorded, if any."""
    timeline = _current.get()
    if timeline is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        timeline.add(what, start, time.perf_counter())


def add_span(what: str, start: float, end: float) -> None:
    """Record a span measured elsewhere (another thread's work) on the timeline being recorded, if any."""
    timeline = _current.get()
    if timeline is not None:
        timeline.add(what, start, end)


def as_records(spans: list[Span]) -> list[dict[str, Any]]:
    """The spans as JSON-ready dicts, by start time (the bench's ``cold_timeline`` / ``warm_timeline``)."""
    return [{**asdict(s), "duration_s": s.duration_s} for s in sorted(spans, key=lambda s: (s.start_s, -s.end_s))]


def format_timeline(spans: list[Span]) -> str:
    """The spans as text lines, by start time: ``  0.12 -   1.80  (1.68 s)  trace DecoderLayer``."""
    return "\n".join(f"{r['start_s']:7.2f} - {r['end_s']:7.2f}  ({r['duration_s']:6.2f} s)  {r['what']}"
                     for r in as_records(spans))
