"""The compile report: what the last ``layerpass`` compile did and how long it took."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("layerpass")


@dataclass
class PieceInfo:
    """One piece of the split graph."""

    name: str
    kind: str  # "compiled" (Inductor) or "eager" (a splitting op)
    key: str | None  # structural hash; equal keys share one compiled artifact
    layer: int | None  # decoder-layer index in "layers" mode
    source: str = ""  # "compiled", "cache", "shared" (reused an artifact of this compile), "eager"
    constants: list[tuple[str, str, Any]] = field(default_factory=list)  # (node, target, value) str constants
    shape_key: str | None = None  # the hash with constants masked (see piece_hash.PieceSignature)


@dataclass
class CompileReport:
    num_pieces: int = 0
    num_unique_pieces: int = 0
    num_compiled: int = 0
    num_cache_hits: int = 0
    num_eager_pieces: int = 0
    matches: dict[str, int] = field(default_factory=dict)  # layers covered (a shared piece counts per use)
    matches_compiled: dict[str, int] = field(default_factory=dict)  # matches actually performed
    registrations: dict[str, int] = field(default_factory=dict)
    pass_time_s: dict[str, float] = field(default_factory=dict)
    pass_failures: list[str] = field(default_factory=list)
    dynamo_s: float = 0.0
    compile_s: float = 0.0
    total_s: float = 0.0
    recompiles: int = 0
    split: str = "layers"
    trace: str = "whole-model"  # "regions": each distinct decoder layer traced once; "whole-model": every layer traced
    num_regions: int = 0  # distinct region traces (bodies compiled once, called at every layer)
    warm_start: str = "off"  # "loaded" (no Dynamo), "saved", "fallback: <why>", "off" (disabled)
    pieces: list[PieceInfo] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"layerpass: {self.num_pieces} pieces ({self.num_unique_pieces} unique, "
            f"{self.num_compiled} compiled, {self.num_cache_hits} from cache) in {self.total_s:.2f} s"
        )


_last: CompileReport | None = None
_history: list[CompileReport] = []


def publish(report: CompileReport) -> None:
    global _last
    _last = report
    _history.append(report)
    logger.info(report.summary())


def last_compile_report() -> CompileReport:
    """The report of the most recent ``layerpass`` compile in this process."""
    if _last is None:
        raise RuntimeError("no layerpass compile has run in this process yet")
    return _last


def compile_reports() -> list[CompileReport]:
    """Every report of this process, oldest first."""
    return list(_history)
