"""Regions: each distinct decoder layer is traced by Dynamo once, compiled once, called at every layer.

``layerpass.compile`` finds the model's repeated layers (the children of its outermost
``ModuleList`` of two or more modules) and, while the compiled model runs, routes each layer's
call through ``Regions.call``. A *region* is one AOT-compiled program of the layer class's
``forward`` (``torch.compile(..., fullgraph=True).aot_compile``): the layer itself is an
argument, so its weights are graph inputs and one program serves every layer that passes the
program's guards. A layer is served by a region only if

- its structure signature (``backend/signature.py``: classes, parameter/buffer shapes and dtypes,
  callables and other objects on every submodule: what Dynamo's saved guards do not check) equals
  the region's, and
- Dynamo's guards of the region pass for this layer and these inputs (tensor metadata, the
  ``str`` and other constants the trace read, ``None``-ness of inputs, ...).

Otherwise the layer is traced into a new region. The other layers then cost one guard check at
the call site: Dynamo never walks them, and the backend hashes, compiles, stores and loads per
distinct piece. Everything outside the repeated layers (embedding, final norm, LM head) runs as
the model's own eager code: a few op calls.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .compiler import LayerpassBackend
from .isa_probe import wait_for_cpu_isa_probe
from .program import PiecewiseProgram
from .report import CompileReport
from .signature import layer_signature
from .warm_start import ProgramStore

logger = logging.getLogger("layerpass")

# The token count of the step being run (set by the compiled model): dims of this size are dynamic.
_STEP_TOKENS: contextvars.ContextVar[int | None] = contextvars.ContextVar("layerpass_step_tokens", default=None)


def find_repeated_layers(model: nn.Module) -> list[nn.Module]:
    """The children of the outermost ``ModuleList`` that holds two or more modules (the decoder
    layers); outermost, so a layer's own list of heads or experts is never mistaken for it."""
    for _, module in _breadth_first(model):
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            return list(module)
    return []


def _breadth_first(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    queue = [("", model)]
    while queue:
        name, module = queue.pop(0)
        yield name, module
        queue.extend((f"{name}.{n}" if name else n, m) for n, m in module.named_children())


@dataclass
class Region:
    """One traced-and-compiled layer program, and the layers that call it."""

    aot: Any  # torch._dynamo.aot_compile.AOTCompiledFunction
    cls: type
    signature: str
    source: str  # "compiled" or "loaded"
    path: str | None = None  # the saved file it was loaded from
    dynamo_s: float = 0.0

    @property
    def program(self) -> PiecewiseProgram:
        return self.aot._artifacts.compiled_fn

    @property
    def report(self) -> CompileReport:
        return self.program.report

    def matches(self, layer: nn.Module, signature: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        return (type(layer) is self.cls and signature == self.signature
                and bool(self.aot.guard_check(layer, *args, **kwargs)))


@dataclass
class RegionsRun:
    """What one compiled-model call did with regions (for its report)."""

    new_regions: list[Region] = field(default_factory=list)
    layer_regions: list[tuple[int, Region]] = field(default_factory=list)  # (layer index, region) per call
    wall_s: float = 0.0


class Regions:
    def __init__(self, layers: list[nn.Module], backend: LayerpassBackend, store: ProgramStore | None,
                 dynamic_tokens: bool) -> None:
        self.layers = layers
        self.index = {id(layer): i for i, layer in enumerate(layers)}
        self.signatures = {id(layer): layer_signature(layer) for layer in layers}
        self.backend = backend
        self.store = store
        self.dynamic_tokens = dynamic_tokens
        self.regions: list[Region] = []
        self.last: dict[int, Region] = {}  # layer id -> the region it used last (checked first)
        self.loaded_classes: set[type] = set()
        self.run: RegionsRun | None = None
        self.failed: str | None = None  # why a layer could not become a region

    @contextlib.contextmanager
    def installed(self, tokens: int | None) -> Iterator[RegionsRun]:
        """Route the layers' calls through ``call`` for the duration of one model call."""
        run = self.run = RegionsRun()
        token = _STEP_TOKENS.set(tokens)
        for layer in self.layers:
            layer.forward = _RegionForward(self, layer)  # instance attribute: shadows the class's forward
        try:
            yield run
        finally:
            for layer in self.layers:
                vars(layer).pop("forward", None)
            _STEP_TOKENS.reset(token)
            self.run = None

    def call(self, layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.failed is not None:  # this step finishes eagerly; the compiled model then goes whole-model
            return type(layer).forward(layer, *args, **kwargs)
        region = self._find(layer, args, kwargs)
        if region is None:
            try:
                region = self._compile(layer, args, kwargs)
            except Exception as e:  # e.g. a graph break, or guards that cannot be saved
                self.failed = f"{type(layer).__name__} cannot be traced as a region ({type(e).__name__}: {_first_line(e)})"
                return type(layer).forward(layer, *args, **kwargs)
        self.last[id(layer)] = region
        if self.run is not None:
            self.run.layer_regions.append((self.index[id(layer)], region))
        return region.aot.fn(layer, *args, **kwargs)

    def _find(self, layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Region | None:
        sig = self.signatures[id(layer)]
        last = self.last.get(id(layer))
        if last is not None and last.matches(layer, sig, args, kwargs):
            return last
        if self.store is not None and type(layer) not in self.loaded_classes:
            self.loaded_classes.add(type(layer))
            t0 = time.perf_counter()
            loaded = self.store.load(type(layer))
            for region in loaded:
                self.regions.append(region)
                if self.run is not None:
                    self.run.new_regions.append(region)
            if self.run is not None:
                self.run.wall_s += time.perf_counter() - t0
        for region in self.regions:
            if region is last or not region.matches(layer, sig, args, kwargs):
                continue
            if region.source == "loaded" and not self._ensure_loaded(region):
                continue
            return region
        return None

    def _ensure_loaded(self, region: Region) -> bool:
        """Load a saved region's pieces on its first use; an unusable one is dropped (and its file)."""
        t0 = time.perf_counter()
        wait_for_cpu_isa_probe()
        try:
            region.program.ensure_loaded()
            return True
        except Exception as e:
            self.regions.remove(region)
            if self.store is not None:
                self.store.drop(region, f"{type(e).__name__}: {e}")
            return False
        finally:
            if self.run is not None:
                self.run.wall_s += time.perf_counter() - t0

    def _compile(self, layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Region:
        wait_for_cpu_isa_probe()  # before the clock: Inductor start-up, not tracing
        t0 = time.perf_counter()
        # trace on fresh copies: the caller's tensors are neither marked nor aliased by the trace
        example_args, example_kwargs = pytree.tree_map_only(torch.Tensor, _fresh_copy, (args, kwargs))
        if self.dynamic_tokens:
            mark_token_dims_of(example_args, example_kwargs, _STEP_TOKENS.get())
        fn = torch.compile(type(layer).forward, backend=self.backend, fullgraph=True)
        # the trace must not see the routing attribute (it would reach this object's state)
        routed = vars(layer).pop("forward", None)
        self.backend.whole_layer = True  # a layer's own lists (heads, experts) are not decoder layers
        try:
            aot = fn.aot_compile(((layer, *example_args), example_kwargs))
        finally:
            self.backend.whole_layer = False
            if routed is not None:
                layer.forward = routed
        wall = time.perf_counter() - t0
        if not isinstance(aot._artifacts.compiled_fn, PiecewiseProgram):
            raise TypeError(f"the layerpass backend returned {type(aot._artifacts.compiled_fn).__name__}")
        region = Region(aot, type(layer), self.signatures[id(layer)], "compiled")
        region.dynamo_s = max(0.0, wall - region.report.compile_s)
        self.regions.append(region)
        if self.run is not None:
            self.run.new_regions.append(region)
            self.run.wall_s += wall
        if self.store is not None:
            self.store.save(region)
        return region


class _RegionForward:
    """A layer's ``forward`` while the compiled model runs: the layer's call goes to its region."""

    __slots__ = ("regions", "layer")

    def __init__(self, regions: Regions, layer: nn.Module) -> None:
        self.regions = regions
        self.layer = layer

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.regions.call(self.layer, args, kwargs)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:200] if lines else ""


def _fresh_copy(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)


def mark_token_dims_of(args: tuple[Any, ...], kwargs: dict[str, Any], tokens: int | None) -> None:
    """Mark the token dims of a layer's tensor inputs unbacked before tracing it.

    The token dims are those of the step's token count (``[T, H]``, HF's ``[1, T, H]``, ...);
    with one token the count is ambiguous, so nothing is marked and the region is specialised
    to one token (a later multi-token step traces a dynamic region, and both are kept).
    Unknown count: dim 0 of every tensor, the zoo's layout."""
    if tokens is not None and tokens <= 1:
        return
    for leaf in pytree.tree_leaves((args, kwargs)):
        if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0:
            continue
        dims = [0] if tokens is None else [d for d, n in enumerate(leaf.shape) if n == tokens]
        for d in dims:
            torch._dynamo.decorators.mark_unbacked(leaf, d)
