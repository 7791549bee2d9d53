"""The pass manager: Inductor's ``post_grad_custom_post_pass`` for every layerpass piece,
and the pass list (``configure``), written as code.

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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from layerpass import envs
from layerpass.patterns.act_quant import ActQuantFusionPass
from layerpass.patterns.attn_quant import AttnQuantFusionPass
from layerpass.patterns.moe_quant_input import MoEQuantInputFusionPass
from layerpass.patterns.moe_shared import MoESharedFusionPass
from layerpass.patterns.norm_quant import NormQuantFusionPass

from .base import LayerpassPass, PieceContext, compiling_piece
from .cleanup import DeadCodeEliminationPass
from .fix_functionalization import FixFunctionalizationPass
from .lowering import LoweringPass
from .noop_elimination import NoOpEliminationPass

if TYPE_CHECKING:
    from layerpass.backend.config import CompilationConfig

logger = logging.getLogger("layerpass")


def configure(config: CompilationConfig) -> list[LayerpassPass]:
    """The passes a ``CompilationConfig`` turns on, in the one fixed order:

    1. no-op elimination (``eliminate_noops``): reshapes/views/slices that change nothing, so
       the fusion patterns see the chains they are written for;
    2. fusions, one module each in ``layerpass.patterns``: attention+quant (``fuse_attn_quant``),
       norm+quant (``fuse_norm_quant``), act+quant (``fuse_act_quant``), MoE shared experts and
       MoE quantised input (both ``fuse_moe``);
    3. lowering (``custom_ops``): each lowerable layerpass op left unfused (norms, SiLU-and-mul,
       FP8 quant and matmul, the fused norm/act+quant ops) is replaced by its native torch code,
       which Inductor generates and fuses with its neighbours; omitted when ``custom_ops`` keeps
       every op custom;
    4. dead-code clean-up: the unfused producers the fusions left without users;
    5. fix functionalization, always last: ``auto_functionalized`` back to in-place calls so
       Inductor makes no copies.

    Out-of-tree passes join with ``PassManager.add_pass``."""
    lowered = config.lowered_ops()
    switched: list[tuple[bool, Callable[[], LayerpassPass]]] = [
        (config.eliminate_noops, NoOpEliminationPass),
        (config.fuse_attn_quant, AttnQuantFusionPass),
        (config.fuse_norm_quant, NormQuantFusionPass),
        (config.fuse_act_quant, ActQuantFusionPass),
        (config.fuse_moe, MoESharedFusionPass),
        (config.fuse_moe, MoEQuantInputFusionPass),
        (bool(lowered), lambda: LoweringPass(lowered)),
        (True, DeadCodeEliminationPass),
        (True, FixFunctionalizationPass),
    ]
    return [make() for on, make in switched if on]


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
    """Runs ``passes`` in order on each piece's post-grad graph (see ``configure`` for the order)."""

    def __init__(self, passes: Sequence[LayerpassPass], config_fingerprint: str = "") -> None:
        self.passes = list(passes)
        self.config_fingerprint = config_fingerprint
        self._unwritable_dumps: set[str] = set()  # dump dirs already warned about

    @classmethod
    def from_config(cls, config: CompilationConfig) -> PassManager:
        return cls(configure(config), config.fingerprint())

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
