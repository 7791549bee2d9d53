"""Which list holds the decoder layers: the one rule, read from a model or from a Dynamo graph.

The rule (``choose``): among the ``nn.ModuleList``s holding two or more modules, those not inside
another such list (a layer's own list of heads or experts is never taken for the layers); of
those, the one holding the most modules, then the shallowest, then the first in module order.

Two readers feed it, so regions (``backend/regions/router.py``), the split of a whole-model graph
(``backend/pieces/split.py``) and the doctor (which uses both) agree on the same model:

- ``in_model``: the model's ``ModuleList``s and their lengths;
- ``in_graph``: the module paths of the graph's ``nn_module_stack`` with indexed children
  (``layers.0``, ``layers[1]``) and how many distinct indices ran. A path that is itself on the
  stack was called (an ``nn.Sequential``, a container with a ``forward``): not a ``ModuleList``,
  so it is no candidate, as in ``in_model``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import fx, nn

_INDEXED = re.compile(r"^(.*?)(?:\[(\d+)\]|\.(\d+))$")


def _inside(path: str, container: str) -> bool:
    """``path`` is a module under ``container`` (``layers.0.heads`` under ``layers``)."""
    return len(path) > len(container) and path.startswith(container) and path[len(container)] in ".["


def _depth(path: str) -> int:
    return path.count(".") + path.count("[")


def choose(lists: Iterable[tuple[str, int]]) -> str | None:
    """The layers' container among ``(path, number of modules)`` of a model's lists, in module
    order (the module docstring's rule), or None."""
    candidates = [(i, path, n) for i, (path, n) in enumerate(lists) if n >= 2]
    outer = [c for c in candidates if not any(_inside(c[1], other) for _, other, _ in candidates)]
    if not outer:
        return None
    return min(outer, key=lambda c: (-c[2], _depth(c[1]), c[0]))[1]


def in_model(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The layers' ``ModuleList`` of ``model`` and its dotted path (``"model.layers"``), or None."""
    lists = {name: m for name, m in model.named_modules() if isinstance(m, nn.ModuleList)}
    path = choose((name, len(m)) for name, m in lists.items())
    return None if path is None else (path, lists[path])


def indexed_paths(node: fx.Node) -> list[tuple[str, int]]:
    """``(parent path, index)`` of each indexed module on ``node``'s ``nn_module_stack``."""
    out = []
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        m = _INDEXED.match(path)
        if m:
            out.append((m.group(1), int(m.group(2) or m.group(3))))
    return out


def in_graph(gm: fx.GraphModule) -> str | None:
    """The layers' container path in a Dynamo graph (as its ``nn_module_stack`` names it), or None."""
    indices: dict[str, set[int]] = {}
    called: set[str] = set()
    for node in gm.graph.nodes:
        called.update(path for path, _ in (node.meta.get("nn_module_stack") or {}).values())
        for parent, idx in indexed_paths(node):
            indices.setdefault(parent, set()).add(idx)
    return choose((path, len(idx)) for path, idx in indices.items() if path not in called)
