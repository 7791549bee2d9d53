"""``Region``: one traced-and-compiled decoder-layer program and the check that decides which
layer calls it serves (``backend/regions/router.py`` routes the calls, ``backend/regions/warm_start.py`` saves
and loads regions)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from .aot import GuardCheck
from ..pieces.program import PiecewiseProgram
from ..report.compile_report import CompileReport
from .trace_deps import TraceDeps

if TYPE_CHECKING:
    from ..pieces.compiler import LayerCompiler


@dataclass
class Region:
    """One traced-and-compiled layer program, and the layers that call it.

    ``aot`` is torch's ``AOTCompiledFunction`` (its guards decide which layers it serves; it can be
    saved). A layer frame whose guards torch cannot save is still traced once, by Dynamo in memory
    (``aot`` is None, ``fn`` is the ``torch.compile``d forward whose own guards and retraces decide,
    each retrace a program of ``compiler``); only its warm start is off (``unsaved`` says why)."""

    fn: Any  # what a layer call runs: (layer, *args, **kwargs) -> output
    aot: Any  # AOTCompiledFunction, or None for an in-memory region
    program: PiecewiseProgram
    cls: type
    signature: str
    deps: TraceDeps
    source: str  # "compiled", "in memory" or "loaded"
    path: str | None = None  # the saved file it was loaded from
    unsaved: str | None = None  # why this region cannot be saved, if it cannot
    compiler: LayerCompiler | None = None  # an in-memory region's backend (Dynamo may call it again)
    waited: bool = False  # loaded after waiting for another process (sharing the cache dir) to trace it

    def __post_init__(self) -> None:
        self._guards = None if self.aot is None else GuardCheck(self.aot)

    @property
    def report(self) -> CompileReport:
        return self.program.report

    def matches(self, layer: nn.Module, signature: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """The one check per layer call: class, structure signature, then the program's guards."""
        if type(layer) is not self.cls or signature != self.signature:
            return False
        if self._guards is None:
            return True  # an in-memory region: Dynamo checks its own guards on the call (and retraces on a miss)
        f_locals = self._guards.bind(layer, args, kwargs)
        if not self._guards.check(f_locals):
            return False
        return not self.deps.has_local_checks or self.deps.check_locals(f_locals)
