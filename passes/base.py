"""``LayerpassPass``: the one base every graph pass derives from."""

from __future__ import annotations

import hashlib
import inspect
import sys
from typing import Any, ClassVar

from torch import fx


class LayerpassPass:
    """A post-grad graph pass. Subclasses set ``name`` and implement ``apply(graph) -> matches``.

    ``registrations`` counts the patterns the pass registered (pattern passes set it);
    ``uuid()`` hashes the source of the pass's module and whatever ``config_key()``
    returns, so editing a pass invalidates Inductor's and layerpass's caches.
    """

    name: ClassVar[str] = "pass"

    def __init__(self) -> None:
        self.registrations = 0

    def apply(self, graph: fx.Graph) -> int:
        raise NotImplementedError

    def prepare(self, context: dict[str, Any]) -> None:
        """Called before each piece's compile with what the backend knows (layer names, ...)."""

    def config_key(self) -> str:
        return ""

    def uuid(self) -> str:
        h = hashlib.sha256()
        for cls in type(self).__mro__:
            if cls is object:
                continue
            module = sys.modules.get(cls.__module__)
            try:
                h.update(inspect.getsource(module or cls).encode())
            except (OSError, TypeError):
                h.update(cls.__qualname__.encode())
        h.update(self.config_key().encode())
        return h.hexdigest()
