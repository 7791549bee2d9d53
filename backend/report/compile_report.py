"""The compile report: what the last ``layerpass`` compile did and how long it took."""

from __future__ import annotations

import collections
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from .timeline import Span, format_timeline

logger = logging.getLogger("layerpass")


LOADED_SOURCES = ("cache", "remote", "waited")


@dataclass
class PieceInfo:
    """One piece of the split graph."""

    name: str
    kind: str  # "compiled" (Inductor) or "eager" (a splitting op)
    key: str | None  # structural hash; equal keys share one compiled artifact
    layer: int | None  # decoder-layer index in "layers" mode
    # "compiled"; loaded: "cache" (local dir), "remote" (remote store), "waited" (stored by another
    # process that held the key's lock while this one waited); "shared" (an artifact of this compile), "eager"
    source: str = ""
    constants: list[tuple[str, str, Any]] = field(default_factory=list)  # (node, target, value) str constants
    shape_key: str | None = None  # the hash with constants masked (see piece_hash.PieceSignature)


@dataclass
class CompileReport:
    num_pieces: int = 0
    num_unique_pieces: int = 0
    num_compiled: int = 0
    num_cache_hits: int = 0  # pieces loaded: local dir, remote store, or after waiting for another process
    num_waited: int = 0  # of those, loaded after waiting for another process that compiled them
    num_eager_pieces: int = 0
    matches: dict[str, int] = field(default_factory=dict)  # layers covered (a shared piece counts per use)
    matches_compiled: dict[str, int] = field(default_factory=dict)  # matches actually performed
    registrations: dict[str, int] = field(default_factory=dict)
    pass_time_s: dict[str, float] = field(default_factory=dict)
    pass_failures: list[str] = field(default_factory=list)
    dynamo_s: float = 0.0
    compile_s: float = 0.0
    total_s: float = 0.0
    recompiles: int = 0  # traces of a frame this backend had compiled before (a guard failed), so far
    graph_breaks: int = 0  # whole model: frames traced beyond the first (graph-break continuations), so far
    split: str = "layers"
    compiler: str = "inductor"  # CompilationConfig.compiler: "inductor", or a debug compiler ("aot_eager", "eager")
    trace: str = "whole-model"  # "regions": each distinct decoder layer traced once; "whole-model": every layer traced
    num_regions: int = 0  # distinct region traces (bodies compiled once, called at every layer)
    warm_start: str = "off"  # "loaded" (no Dynamo), "saved", "fallback: <why>", "off" (disabled)
    eager_layers: dict[int, str] = field(default_factory=dict)  # layer -> why it runs eagerly (on_compile_error="eager")
    pieces: list[PieceInfo] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # where the call went (layerpass.compile): ISA probe, model key, Dynamo, each piece's compile, saves,
    # loads, in seconds from the compile call (first call) or the call; ``format_timeline()`` prints it
    timeline: list[Span] = field(default_factory=list)

    def add_piece(self, info: PieceInfo, stats: dict[str, Any], first_here: bool) -> None:
        """Count one piece of a compiled graph: its fusions per use, and what obtaining it cost
        (pass statistics of a fresh compile, a cache hit) once per distinct piece."""
        if info.source in LOADED_SOURCES and first_here:
            self.num_cache_hits += 1
            self.num_waited += info.source == "waited"
        if info.source == "compiled":
            self.num_compiled += 1
            for name, s in stats.get("passes", {}).items():
                _add(self.matches_compiled, name, int(s["matches"]))
                _add(self.pass_time_s, name, float(s["time_s"]))
            self.pass_failures.extend(stats.get("failures", []))
        for name, s in stats.get("passes", {}).items():
            _add(self.matches, name, int(s["matches"]))
            self.registrations[name] = max(self.registrations.get(name, 0), int(s.get("registrations", 0)))
        self.num_pieces += 1
        self.pieces.append(info)

    def merge(self, other: CompileReport, *, layer: int | None, fresh: bool) -> None:
        """Add one use of a program whose own report is ``other`` (a region, called by decoder
        layer ``layer``): its pieces and the fusions they cover; with ``fresh`` (the first use of
        a program obtained by this call) also what obtaining it cost."""
        for p in other.pieces:
            source = p.source if fresh else ("eager" if p.kind == "eager" else "shared")
            self.pieces.append(dataclasses.replace(p, layer=layer, source=source))
            if p.kind == "compiled":
                self.num_pieces += 1
            else:
                self.num_eager_pieces += 1
        for name, n in other.matches.items():
            _add(self.matches, name, n)
        for name, n in other.registrations.items():
            self.registrations[name] = max(self.registrations.get(name, 0), n)
        if fresh:
            self.num_compiled += other.num_compiled
            self.num_cache_hits += other.num_cache_hits
            self.num_waited += other.num_waited
            self.dynamo_s += other.dynamo_s
            self.compile_s += other.compile_s
            self.pass_failures.extend(other.pass_failures)
            self.notes.extend(n for n in other.notes if n not in self.notes)
            for name, n in other.matches_compiled.items():
                _add(self.matches_compiled, name, n)
            for name, t in other.pass_time_s.items():
                _add(self.pass_time_s, name, t)
        self.num_unique_pieces = len({p.key for p in self.pieces if p.kind == "compiled"})

    def mark_waited(self) -> None:
        """This program was traced by another process while this one waited: its loaded pieces count as waited."""
        for i, p in enumerate(self.pieces):
            if p.source in ("cache", "remote"):
                self.pieces[i] = dataclasses.replace(p, source="waited")
        self.num_waited = len({p.key for p in self.pieces if p.source == "waited"})

    def format_timeline(self) -> str:
        """The timeline as text, one span a line, by start time."""
        return format_timeline(self.timeline)

    def summary(self) -> str:
        return (
            f"layerpass: {self.num_pieces} pieces ({self.num_unique_pieces} unique, "
            f"{self.num_compiled} compiled, {self.num_cache_hits} from cache) in {self.total_s:.2f} s"
            + (f"; {self.num_waited} of them after waiting for another process" if self.num_waited else "")
            + (f"; compiler={self.compiler!r} (a debug compiler)" if self.compiler != "inductor" else "")
        )

    def piece_sources(self) -> dict[str, int]:
        """Distinct pieces by how they were obtained: compiled, loaded (cache or remote), waited."""
        firsts: dict[str, str] = {}
        for p in self.pieces:
            if p.kind == "compiled" and p.key is not None and p.source != "shared":
                firsts.setdefault(p.key, p.source)
        counts = {"compiled": 0, "loaded": 0, "waited": 0}
        for source in firsts.values():
            counts["waited" if source == "waited" else "compiled" if source == "compiled" else "loaded"] += 1
        return counts


def _add(counts: dict[str, Any], name: str, n: Any) -> None:
    counts[name] = counts.get(name, 0) + n


HISTORY_LIMIT = 256  # reports kept: a long-running server compiles for ever, its history must not grow


class _ReportLog:
    """The reports published in this process: the newest ``HISTORY_LIMIT``, and how many in all."""

    def __init__(self) -> None:
        self.recent: collections.deque[CompileReport] = collections.deque(maxlen=HISTORY_LIMIT)
        self.count = 0

    def publish(self, report: CompileReport) -> None:
        self.recent.append(report)
        self.count += 1

    def since(self, count: int) -> list[CompileReport]:
        new = self.count - count
        if new > len(self.recent):
            raise ValueError(f"{new} reports were published since, more than the {HISTORY_LIMIT} kept")
        return list(self.recent)[len(self.recent) - new:] if new > 0 else []


_log = _ReportLog()


def publish(report: CompileReport) -> None:
    _log.publish(report)
    logger.info(report.summary())


def last_compile_report() -> CompileReport:
    """The report of the most recent ``layerpass`` compile in this process."""
    if not _log.recent:
        raise RuntimeError("no layerpass compile has run in this process yet")
    return _log.recent[-1]


def num_compile_reports() -> int:
    """How many reports this process has published (a mark for ``compile_reports(since=...)``)."""
    return _log.count


def compile_reports(since: int | None = None) -> list[CompileReport]:
    """The reports published after mark ``since`` (from ``num_compile_reports()``), oldest first;
    without it, the newest ``HISTORY_LIMIT``."""
    return list(_log.recent) if since is None else _log.since(since)
