"""What the backend returns: the split graph calling its compiled pieces, serialisable for a warm start.

``PiecewiseProgram`` runs the split graph, in which each compiled piece is a ``PieceRunner`` (the
shared Inductor artifact plus the piece's calling convention) and each splitting op runs eagerly.
It implements torch's ``SerializableCallable``, so ``torch.compile(...).aot_compile`` can save the
traced program: what is saved is Dynamo's graph (weights are graph *inputs*, never baked in) and,
per compiled piece, the key of its artifact in the on-disk ``ArtifactCache`` plus its calling
convention. Loading re-splits the graph (the split is deterministic) and loads each distinct
artifact once; a missing or unusable artifact raises, and the caller falls back to compiling.
"""

from __future__ import annotations

import contextlib
import contextvars
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import fx, nn
from torch._dynamo.aot_compile_types import SerializableCallable

from ..report.compile_report import CompileReport
from ..report.timeline import span

FORMAT_VERSION = 2  # 2: sizes kept for re-splitting, PieceCall.num_args


class PieceRunner(nn.Module):
    """Stands in for a piece in the split graph: calls its compiled artifact with the piece's
    calling convention; optional static-size variants compiled on first use."""

    def __init__(self, artifact: Callable[..., Any], single_output: bool, token_arg: int | None = None,
                 compile_static: Callable[[list[Any]], Callable[..., Any]] | None = None,
                 compile_sizes: Sequence[int] = ()) -> None:
        super().__init__()
        self.artifact = artifact
        self.single_output = single_output
        self.token_arg = token_arg
        self.compile_static = compile_static
        self.compile_sizes = set(compile_sizes)
        self.static: dict[int, Callable[..., Any]] = {}

    def forward(self, *args: Any) -> Any:
        fn = self.artifact
        if self.compile_sizes and self.token_arg is not None and self.compile_static is not None:
            n = int(args[self.token_arg].shape[0])
            if n in self.compile_sizes:
                if n not in self.static:
                    self.static[n] = self.compile_static(list(args))
                fn = self.static[n]
        out = fn(*args)
        if self.single_output and isinstance(out, (list, tuple)):
            return out[0]
        return tuple(out) if isinstance(out, list) else out


@dataclass(frozen=True)
class PieceCall:
    """How the split graph calls one compiled piece: its artifact's cache key and calling convention."""

    key: str
    single_output: bool
    token_arg: int | None
    num_args: int  # checked against the loaded graph's split before any piece runs


def _strip_for_pickle(gm: fx.GraphModule) -> None:
    """Drop node metadata that holds live Python objects (module stacks, opaque objects).

    What re-splitting the loaded graph needs stays: the symbolic sizes of each value (a tensor's
    as a tuple of its sizes, strides and offset), from which ``split_module`` threads each piece's
    symbolic-size inputs (``split="ops"`` pieces take the token count as an argument)."""
    for node in gm.graph.nodes:
        for k in ("nn_module_stack", "source_fn_stack", "stack_trace", "from_node"):
            node.meta.pop(k, None)
        sizes = _sizes_only(node.meta.get("example_value"))
        if sizes is None:
            node.meta.pop("example_value", None)
        else:
            node.meta["example_value"] = sizes


def _sizes_only(value: Any) -> Any:
    """``value`` with each tensor replaced by its sizes, strides and offset; None if it holds
    anything but tensors, sizes and plain scalars."""
    if isinstance(value, torch.Tensor):
        return (*value.shape, *value.stride(), value.storage_offset())
    if isinstance(value, (tuple, list)):
        parts = [_sizes_only(v) for v in value]
        return None if any(p is None for p in parts) else tuple(parts)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)):
        return value
    return None


class PieceInstaller(Protocol):
    """What rebuilds a loaded program's pieces (``LayerpassBackend.install_saved``)."""

    def install_saved(self, gm: fx.GraphModule, calls: dict[str, PieceCall],
                      state: dict[str, Any]) -> tuple[fx.GraphModule, CompileReport]: ...


# programs read from disk while ``loading_programs`` runs (torch's loader builds them; the
# caller gets them here rather than from the loaded function's private artifacts)
_LOADED: contextvars.ContextVar[list[PiecewiseProgram] | None] = contextvars.ContextVar("layerpass_loaded", default=None)


@contextlib.contextmanager
def loading_programs() -> Iterator[list[PiecewiseProgram]]:
    """Collects each ``PiecewiseProgram`` deserialised in this block."""
    loaded: list[PiecewiseProgram] = []
    token = _LOADED.set(loaded)
    try:
        yield loaded
    finally:
        _LOADED.reset(token)


class PiecewiseProgram(SerializableCallable):
    """The split graph with its pieces installed. ``graph`` is Dynamo's graph (kept for saving)."""

    def __init__(self, split_gm: fx.GraphModule | None, graph: fx.GraphModule | None, pieces: dict[str, PieceCall],
                 state: dict[str, Any], report: CompileReport | None) -> None:
        self.split_gm = split_gm
        self.graph = graph
        self.pieces = pieces
        self.state = state  # what loading needs besides the graph: the config it was split with
        self._report = report  # how this program's pieces were obtained
        self.traced_code: list[Any] = []  # code objects Dynamo traced (in memory; see trace_deps)

    @property
    def report(self) -> CompileReport:
        if self._report is None:
            raise RuntimeError("a loaded program's report exists once its pieces are loaded (ensure_loaded)")
        return self._report

    def ensure_loaded(self, backend: PieceInstaller) -> None:
        """Load the pieces of a program read from disk (on first use: only programs that run pay)
        with ``backend``, which also compiles any static-size variant later."""
        if self.split_gm is None:
            assert self.graph is not None
            with span("load pieces (a saved program's artifacts)"):
                self.split_gm, self._report = backend.install_saved(self.graph, self.pieces, self.state)

    def __call__(self, *args: Any) -> Any:
        if self.split_gm is None:
            raise RuntimeError("a loaded program runs once its pieces are loaded (ensure_loaded)")
        return self.split_gm(*args)

    @classmethod
    def serialize_compile_artifacts(cls, fn: PiecewiseProgram) -> bytes:
        from torch.fx._graph_pickler import GraphPickler, Options

        assert fn.graph is not None
        _strip_for_pickle(fn.graph)
        return pickle.dumps({
            "format": FORMAT_VERSION,
            "graph": GraphPickler.dumps(fn.graph, Options(ops_filter=None)),
            "pieces": {name: vars(p) for name, p in fn.pieces.items()},
            "state": fn.state,
        })

    @classmethod
    def deserialize_compile_artifacts(cls, data: bytes) -> PiecewiseProgram:
        from torch._subclasses import FakeTensorMode
        from torch.fx._graph_pickler import GraphPickler
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        blob = pickle.loads(data)
        if blob.get("format") != FORMAT_VERSION:
            raise ValueError(f"saved program format {blob.get('format')!r}, this layerpass reads {FORMAT_VERSION}")
        gm = GraphPickler.loads(blob["graph"], FakeTensorMode(shape_env=ShapeEnv()))
        gm.recompile()
        pieces = {name: PieceCall(**p) for name, p in blob["pieces"].items()}
        program = cls(None, gm, pieces, blob["state"], None)
        sink = _LOADED.get()
        if sink is not None:
            sink.append(program)
        return program
