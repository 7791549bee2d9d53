"""The pass manager: Inductor's ``post_grad_custom_post_pass`` for every layerpass piece.

Passes run in a fixed order (see ``passes.registry.build_passes``). Each is timed; a pass
that raises is skipped for that piece (its graph restored to what it was before the
pass) with a warning naming it, and the compile goes on. With ``LAYERPASS_DEBUG_DUMP=<dir>``
the graph before and after each pass is written there as readable Python.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from layerpass import envs

from .base import LayerpassPass

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


class PassManager(CustomGraphPass):
    def __init__(self, passes: Sequence[LayerpassPass], config_fingerprint: str = "") -> None:
        self.passes = list(passes)
        self.config_fingerprint = config_fingerprint
        self.piece_name = "piece"
        self.context: dict[str, Any] = {}
        self.stats: dict[str, dict[str, float]] = {}
        self.failures: list[str] = []
        self.runs = 0

    def begin_piece(self, name: str, context: dict[str, Any] | None = None) -> None:
        """Reset per-piece stats before Inductor compiles the piece called ``name``."""
        self.piece_name = name
        self.context = context or {}
        self.stats = defaultdict(lambda: {"matches": 0, "time_s": 0.0})
        self.failures = []
        for p in self.passes:
            p.prepare(self.context)

    def __call__(self, graph: fx.Graph) -> None:
        self.runs += 1
        dump_dir = envs.debug_dump_dir()
        piece_dir = None
        if dump_dir:
            piece_dir = os.path.join(dump_dir, re.sub(r"[^\w.-]", "_", self.piece_name))
            os.makedirs(piece_dir, exist_ok=True)
        for i, p in enumerate(self.passes):
            snapshot = _snapshot(graph)
            before = graph_source(graph) if piece_dir else None
            t0 = time.perf_counter()
            try:
                matches = int(p.apply(graph) or 0)
                graph.lint()
            except Exception as e:  # a failing pass must never break the compile
                _restore(graph, snapshot)
                msg = f"pass {p.name!r} failed on piece {self.piece_name!r} and was skipped (graph left unfused): {type(e).__name__}: {e}"
                logger.warning("layerpass: %s", msg)
                self.failures.append(msg)
                matches = 0
            dt = time.perf_counter() - t0
            self.stats[p.name]["matches"] += matches
            self.stats[p.name]["time_s"] += dt
            self.stats[p.name]["registrations"] = p.registrations
            if piece_dir:
                stem = os.path.join(piece_dir, f"{i:02d}_{p.name}")
                with open(stem + "_before.py", "w") as f:
                    f.write(before)
                with open(stem + "_after.py", "w") as f:
                    f.write(graph_source(graph))
        if piece_dir:
            with open(os.path.join(piece_dir, "stats.json"), "w") as f:
                json.dump({"stats": dict(self.stats), "failures": self.failures}, f, indent=2)

    def uuid(self) -> str:
        h = hashlib.sha256(self.config_fingerprint.encode())
        for p in self.passes:
            h.update(p.name.encode())
            h.update(p.uuid().encode())
        return h.hexdigest()
