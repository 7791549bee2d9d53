"""Post-fusion dead-code clean-up: fusions leave the unfused producers without users."""

from __future__ import annotations

from torch import fx

from .base import LayerpassPass


class DeadCodeEliminationPass(LayerpassPass):
    name = "dead_code_elimination"

    def apply(self, graph: fx.Graph) -> int:
        before = len(graph.nodes)
        graph.eliminate_dead_code()  # keeps impure nodes (mutating ops, placeholders)
        return before - len(graph.nodes)
