"""The pass manager: Inductor's ``post_grad_custom_post_pass`` for every layerpass piece. Which
passes it runs, in which order, is the backend's pass list (``backend/pieces/pass_list.py``).

Each pass is timed; a pass that raises is skipped for that piece (its graph restored to what
it was before the pass) with a warning naming it, and the compile goes on. With
``LAYERPASS_DEBUG_DUMP=<dir>`` the graph before and after each pass is written there as
readable Python; a dir that cannot be written is warned about once and dumps are skipped.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
import re
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from layerpass import envs

from .base import LayerpassPass, PieceContext, compiling_piece

logger = logging.getLogger("layerpass")


def _snapshot(graph: fx.Graph) -> fx.Graph:
    copy = fx.Graph()
    out = copy.graph_copy(graph, {})
    copy.output(out)
    return copy


def _restore(graph: fx.Graph, snapshot: fx.Graph) -> None:
    for node in reversed(list(graph.nodes)):
        graph.erase_node(node)
    out = graph.graph_copy(snapshot, {})
    graph.output(out)


def graph_source(graph: fx.Graph) -> str:
    return graph.python_code("self").src


@dataclass
class PieceRun:
    """What the passes did to one piece: per-pass matches, time and registrations, and failures."""

    name: str
    stats: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(lambda: {"matches": 0, "time_s": 0.0}))
    failures: list[str] = field(default_factory=list)
    ran: bool = False  # False if Inductor served the piece from its own cache without running the passes

    def as_dict(self) -> dict[str, Any]:
        return {"passes": {k: dict(v) for k, v in self.stats.items()}, "failures": list(self.failures),
                "passes_ran": self.ran}


# the piece whose compile is running (per call, not on the shared manager)
_CURRENT_RUN: contextvars.ContextVar[PieceRun | None] = contextvars.ContextVar("layerpass_piece_run", default=None)


class PassManager(CustomGraphPass):
    """Runs ``passes`` in order on each piece's post-grad graph (the backend's list:
    ``backend.pieces.pass_list.configure``)."""

    def __init__(self, passes: Sequence[LayerpassPass], config_fingerprint: str = "") -> None:
        self.passes = list(passes)
        self.config_fingerprint = config_fingerprint
        self._unwritable_dumps: set[str] = set()  # dump dirs already warned about

    def add_pass(self, pass_: LayerpassPass, *, before: str | None = None, after: str | None = None) -> None:
        """Insert ``pass_`` just before or after the pass called ``before``/``after`` (at most one),
        or last when neither is given. Its ``uuid()`` joins the manager's, so cached pieces
        compiled without it are not reused."""
        if before is not None and after is not None:
            raise ValueError("add_pass takes before= or after=, not both")
        anchor = before if before is not None else after
        if anchor is None:
            self.passes.append(pass_)
            return
        names = [p.name for p in self.passes]
        if anchor not in names:
            raise ValueError(f"add_pass: no pass called {anchor!r}; passes: {names}")
        idx = names.index(anchor)
        self.passes.insert(idx if before is not None else idx + 1, pass_)

    @contextlib.contextmanager
    def piece(self, name: str, context: PieceContext | None = None) -> Iterator[PieceRun]:
        """While Inductor compiles the piece called ``name`` in this block, the passes see
        ``context`` and record into the yielded ``PieceRun``."""
        context = context if context is not None else PieceContext(piece=name)
        for p in self.passes:
            p.prepare(context)
        run = PieceRun(name)
        token = _CURRENT_RUN.set(run)
        try:
            with compiling_piece(context):
                yield run
        finally:
            _CURRENT_RUN.reset(token)

    def __call__(self, graph: fx.Graph) -> None:
        run = _CURRENT_RUN.get()
        if run is None:  # called outside ``piece`` (Inductor on a graph layerpass did not hand it)
            run = PieceRun("piece")
        run.ran = True
        piece_dir = self._piece_dump_dir(run.name)
        for i, p in enumerate(self.passes):
            snapshot = _snapshot(graph)
            before = graph_source(graph) if piece_dir else None
            t0 = time.perf_counter()
            try:
                matches = int(p.apply(graph) or 0)
                graph.lint()
            except Exception as e:  # a failing pass must never break the compile
                _restore(graph, snapshot)
                msg = f"pass {p.name!r} failed on piece {run.name!r} and was skipped (graph left unfused): {type(e).__name__}: {e}"
                logger.warning("layerpass: %s", msg)
                run.failures.append(msg)
                matches = 0
            dt = time.perf_counter() - t0
            run.stats[p.name]["matches"] += matches
            run.stats[p.name]["time_s"] += dt
            run.stats[p.name]["registrations"] = p.registrations
            if piece_dir:
                stem = os.path.join(piece_dir, f"{i:02d}_{p.name}")
                piece_dir = self._dump(piece_dir, {stem + "_before.py": before, stem + "_after.py": graph_source(graph)})
        if piece_dir:
            self._dump(piece_dir, {os.path.join(piece_dir, "stats.json"):
                                   json.dumps({"stats": dict(run.stats), "failures": run.failures}, indent=2)})

    def _piece_dump_dir(self, piece: str) -> str | None:
        """This piece's ``$LAYERPASS_DEBUG_DUMP`` subdir, created; None without dumps."""
        dump_dir = envs.debug_dump_dir()
        if not dump_dir:
            return None
        piece_dir = os.path.join(dump_dir, re.sub(r"[^\w.-]", "_", piece))
        try:
            os.makedirs(piece_dir, exist_ok=True)
        except OSError as e:
            self._warn_unwritable_dump(dump_dir, e)
            return None
        return piece_dir

    def _dump(self, piece_dir: str, files: dict[str, str | None]) -> str | None:
        """Write ``files``; returns ``piece_dir``, or None (no more dumps) when one cannot be written."""
        try:
            for path, text in files.items():
                with open(path, "w") as f:
                    f.write(text or "")
        except OSError as e:
            self._warn_unwritable_dump(envs.debug_dump_dir() or piece_dir, e)
            return None
        return piece_dir

    def _warn_unwritable_dump(self, path: str, error: OSError) -> None:
        if path not in self._unwritable_dumps:
            self._unwritable_dumps.add(path)
            logger.warning("layerpass: %s=%s cannot be written (%s: %s); compiling without graph dumps",
                           envs.DEBUG_DUMP_ENV, path, type(error).__name__, error)

    def uuid(self) -> str:
        h = hashlib.sha256(self.config_fingerprint.encode())
        for p in self.passes:
            h.update(p.name.encode())
            h.update(p.uuid().encode())
        return h.hexdigest()
