"""Regions: each distinct decoder layer is traced by Dynamo once, compiled once, called at every layer.

``layerpass.compile`` finds the model's repeated layers (the children of the ``ModuleList``
that ``backend/layer_container.py`` names) and, while the compiled model runs, routes each layer's
call through ``Regions.call``. A *region* is one AOT-compiled program of the layer class's
``forward`` (``torch.compile(..., fullgraph=True).aot_compile``): the layer itself is an
argument, so its weights are graph inputs and one program serves every layer that passes the
program's guards. A layer is served by a region only if

- its structure signature (``backend/regions/signature.py``: classes, parameter/buffer shapes and dtypes,
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
from torch.utils import _pytree as pytree  # no public pytree in torch 2.13 (torch.utils.pytree is newer)
from torch import nn

from layerpass.torch_compat import compile_for_regions

from .. import layer_container
from ..pieces.compiler import LayerpassBackend
from ..pieces.isa_probe import wait_for_cpu_isa_probe
from .region import Region
from .signature import layer_signature
from ..report.timeline import span
from ..token_dims import mark_token_dims_of
from .torch_patches import dynamo_compile_lock, recording_traced_code, saveable_guards
from .trace_deps import GuardRecorder, record_deps
from .warm_start import ProgramStore

logger = logging.getLogger("layerpass")


# The token count of the step being run (set by the compiled model): dims of this size are dynamic.
_STEP_TOKENS: contextvars.ContextVar[int | None] = contextvars.ContextVar("layerpass_step_tokens", default=None)


def find_layer_container(model: nn.Module) -> nn.ModuleList | None:
    """The decoder layers' ``ModuleList`` (``backend/layer_container.py``: the one rule, shared
    with the split of a whole-model graph and the doctor)."""
    found = layer_container.in_model(model)
    return None if found is None else found[1]


def find_repeated_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers: the children of ``find_layer_container(model)`` (none without one)."""
    container = find_layer_container(model)
    return [] if container is None else list(container)


@dataclass
class RegionsRun:
    """What one compiled-model call did with regions (for its report)."""

    new_regions: list[Region] = field(default_factory=list)
    layer_regions: list[tuple[int, Region]] = field(default_factory=list)  # (layer index, region) per call
    calls: dict[int, int] = field(default_factory=dict)  # layer id -> its calls so far (a module at two positions)
    eager_layers: dict[int, str] = field(default_factory=dict)  # layer index -> why it ran eagerly
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)


class Regions:
    """The regions of one compiled model. Not thread-safe: ``CompiledModel`` calls it under its lock."""

    def __init__(self, container: nn.ModuleList, backend: LayerpassBackend, store: ProgramStore | None,
                 dynamic_tokens: bool, root: nn.Module | None = None) -> None:
        self.container = container
        # the model the container was found in, and where: a list replaced whole is followed
        self.root = root
        found = None if root is None else layer_container.in_model(root)
        self._container_path = found[0] if found is not None and found[1] is container else None
        self._warned_no_container = False
        self.layers: list[nn.Module] = []
        self.index: dict[int, list[int]] = {}  # layer id -> its positions in the list (one module may repeat)
        self.signatures: dict[int, str] = {}
        self.backend = backend
        self.store = store
        self.dynamic_tokens = dynamic_tokens
        self.regions: list[Region] = []
        self.last: dict[int, Region] = {}  # layer id -> the region it used last (checked first)
        self.loaded_classes: set[type] = set()
        self.run: RegionsRun | None = None
        self.failed: str | None = None  # why a layer could not become a region
        # on_compile_error="eager": layer id -> why its region failed to compile (it runs eagerly)
        self.eager: dict[int, str] = {}
        self._warned_causes: set[str] = set()
        # layer class -> why its token count is traced backed (its unbacked trace failed on the count)
        self.backed_tokens: dict[type, str] = {}
        self._warned_own_forward: set[int] = set()
        self._sync_layers()

    def _sync_layers(self) -> bool:
        """Take the container's current layers (replaced or appended after compile: they get
        regions like the others); True if they changed."""
        current = list(self.container)
        if len(current) == len(self.layers) and all(a is b for a, b in zip(current, self.layers)):
            return False
        self.layers = current
        self.index = {}
        for i, layer in enumerate(current):
            self.index.setdefault(id(layer), []).append(i)
        self.signatures = {id(layer): self.signatures.get(id(layer)) or layer_signature(layer) for layer in current}
        self.last = {k: v for k, v in self.last.items() if k in self.index}
        self.eager = {k: v for k, v in self.eager.items() if k in self.index}
        return True

    def begin_step(self) -> list[str]:
        """Once per compiled-model call, before any layer runs: new layers are taken in, and a
        region whose traced code or dropped globals changed since it was traced is dropped (the
        layers that used it are traced again). Returns what changed, for the report."""
        notes = []
        self._follow_container()
        if self._sync_layers():
            notes.append(f"the decoder layers changed since the last call ({len(self.layers)} now): new layers get regions")
        checked: set[Any] = set()
        for region in list(self.regions):
            why = region.deps.changed(checked)
            if why is not None:
                logger.info("layerpass: region of %s is stale (%s); tracing it again", region.cls.__qualname__, why)
                notes.append(f"region of {region.cls.__qualname__} traced again: {why}")
                self._forget(region)
        return notes

    def _follow_container(self) -> None:
        """Follow a layer list replaced whole after compile (``model.layers = nn.ModuleList(...)``):
        its layers get regions like the old ones; with no list of two or more left, warned once."""
        if self.root is None or self._container_path is None:
            return
        try:
            if self.root.get_submodule(self._container_path) is self.container:
                return
        except AttributeError:
            pass
        found = layer_container.in_model(self.root)
        if found is None:
            if not self._warned_no_container:
                self._warned_no_container = True
                logger.warning("layerpass: the model's decoder layer list (%r) was replaced and the model has no "
                               "ModuleList of two or more modules now: its layers run eagerly; call "
                               "layerpass.compile(model) again", self._container_path)
            return
        self._container_path, self.container = found

    def _forget(self, region: Region) -> None:
        self.regions.remove(region)
        self.last = {k: v for k, v in self.last.items() if v is not region}

    @contextlib.contextmanager
    def installed(self, tokens: int | None) -> Iterator[RegionsRun]:
        """Route the layers' calls through ``call`` for the duration of one model call.

        A layer's own instance ``forward`` (set by the user) is honoured: that layer runs it,
        not a region (warned once). Only the routing attribute set here is removed afterwards."""
        run = self.run = RegionsRun()
        token = _STEP_TOKENS.set(tokens)
        routed = []
        for layer in {id(layer): layer for layer in self.layers}.values():  # a module at two positions: once
            if "forward" in vars(layer):
                self._warn_own_forward(layer)
                continue
            router = _RegionForward(self, layer)
            layer.forward = router  # instance attribute: shadows the class's forward
            routed.append((layer, router))
        try:
            yield run
        finally:
            for layer, router in routed:
                if vars(layer).get("forward") is router:
                    del layer.forward
            _STEP_TOKENS.reset(token)
            self.run = None

    def _warn_own_forward(self, layer: nn.Module) -> None:
        if id(layer) not in self._warned_own_forward:
            self._warned_own_forward.add(id(layer))
            logger.warning("layerpass: decoder layer %d (%s) has its own instance forward; it runs that, eagerly, "
                           "not a compiled region", self.index[id(layer)][0], type(layer).__qualname__)

    def call(self, layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.failed is not None:  # this step finishes eagerly; the compiled model then goes whole-model
            return type(layer).forward(layer, *args, **kwargs)
        if id(layer) in self.eager:
            return self._run_eagerly(layer, args, kwargs)
        region = self._find(layer, args, kwargs)
        if region is None:
            try:
                region = self._find_or_trace(layer, args, kwargs)
            except _GRAPH_BREAKS as e:  # the layer cannot be traced whole: the only reason to go whole-model
                self.failed = f"{type(layer).__name__} cannot be traced as a region ({type(e).__name__}: {_first_line(e)})"
                return type(layer).forward(layer, *args, **kwargs)
            except Exception as e:
                if self.backend.config.on_compile_error != "eager":
                    raise
                self._give_up_on(layer, e)
                return self._run_eagerly(layer, args, kwargs)
        self.last[id(layer)] = region
        if self.run is not None:
            self.run.layer_regions.append((self._position(layer), region))
        if region.aot is not None:
            return region.fn(layer, *args, **kwargs)
        return self._call_in_memory(region, layer, args, kwargs)

    def _position(self, layer: nn.Module) -> int:
        """This call's layer index: a module at several positions is at its next one on each call."""
        assert self.run is not None
        positions = self.index[id(layer)]
        n = self.run.calls.get(id(layer), 0)
        self.run.calls[id(layer)] = n + 1
        return positions[min(n, len(positions) - 1)]

    def _give_up_on(self, layer: nn.Module, error: Exception) -> None:
        """``on_compile_error="eager"``: the layer's region failed to compile; it runs eagerly from
        now on (one warning per distinct cause)."""
        cause = f"{type(error).__name__}: {_first_line(error)}"
        self.eager[id(layer)] = f"its region failed to compile ({cause})"
        if cause not in self._warned_causes:
            self._warned_causes.add(cause)
            logger.warning("layerpass: decoder layer %d (%s) runs eagerly: its region failed to compile (%s); "
                           "on_compile_error='eager'", self.index[id(layer)][0], type(layer).__qualname__, cause)

    def _run_eagerly(self, layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.run is not None:
            self.run.eager_layers[self._position(layer)] = self.eager[id(layer)]
        return type(layer).forward(layer, *args, **kwargs)

    def _call_in_memory(self, region: Region, layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """An in-memory region's call; if Dynamo traced again (other guards), that trace is a new
        region of the report (served by the same compiled function)."""
        compiler = region.compiler
        assert compiler is not None
        traces, t0 = len(compiler.programs), time.perf_counter()
        out = region.fn(layer, *args, **kwargs)
        if len(compiler.programs) > traces:
            wall = time.perf_counter() - t0
            retraced = Region(region.fn, None, compiler.programs[-1], region.cls, region.signature,
                              region.deps, "in memory", unsaved=region.unsaved, compiler=compiler)
            retraced.report.dynamo_s = max(0.0, wall - retraced.report.compile_s)
            self.regions.append(retraced)
            self.last[id(layer)] = retraced
            if self.run is not None:
                self.run.new_regions.append(retraced)
                self.run.wall_s += wall
                self.run.layer_regions[-1] = (self.run.layer_regions[-1][0], retraced)
        return out

    def _find(self, layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Region | None:
        sig = self.signatures[id(layer)]
        last = self.last.get(id(layer))
        if last is not None and last.matches(layer, sig, args, kwargs):
            return last
        if self.store is not None and type(layer) not in self.loaded_classes:
            t0 = time.perf_counter()
            with span(f"load programs {type(layer).__qualname__}"):
                self._take_saved(type(layer))
            if self.run is not None:
                self.run.wall_s += time.perf_counter() - t0
        for region in self.regions:
            if region is last or not region.matches(layer, sig, args, kwargs):
                continue
            if region.source == "loaded" and not self._ensure_loaded(region):
                continue
            return region
        return None

    def _find_or_trace(self, layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Region:
        """Trace a region for ``layer`` under the store's lock for its class: a process that
        shares the cache dir and traces it too waits, then loads what this one saved."""
        if self.store is None:
            return self._compile(layer, args, kwargs)
        t0 = time.perf_counter()
        with self.store.hold(type(layer)) as lock:
            # look again under the lock: what a process that held it (or one sharing the dir or the
            # remote store) saved since this class was first loaded
            if self._take_saved(type(layer), waited=lock.waited):
                if self.run is not None:
                    self.run.wall_s += time.perf_counter() - t0
                region = self._find(layer, args, kwargs)
                if region is not None:
                    return region
            return self._compile(layer, args, kwargs)

    def _take_saved(self, cls: type, waited: bool = False) -> bool:
        """The saved regions of ``cls`` this process has not seen yet; True if there were any.
        ``waited``: they were saved by a process this one waited for."""
        assert self.store is not None
        self.loaded_classes.add(cls)
        loaded = self.store.load(cls, waited=waited)
        for region in loaded:
            region.waited = waited
            self.regions.append(region)
            if self.run is not None:
                self.run.new_regions.append(region)
        return bool(loaded)

    def _ensure_loaded(self, region: Region) -> bool:
        """Load a saved region's pieces on its first use; an unusable one is dropped (and its file)."""
        t0 = time.perf_counter()
        wait_for_cpu_isa_probe()
        try:
            region.program.ensure_loaded(self.backend)
            if region.waited:
                region.report.mark_waited()
            return True
        except Exception as e:  # a missing or unreadable artifact: compile instead
            self.regions.remove(region)
            if self.store is not None:
                self.store.drop(region, f"{type(e).__name__}: {e}")
            return False
        finally:
            if self.run is not None:
                self.run.wall_s += time.perf_counter() - t0

    def _compile(self, layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Region:
        # (Inductor's CPU ISA probe is waited for by the backend, after Dynamo's trace: they overlap)
        t0 = time.perf_counter()
        forward = type(layer).forward
        # the trace must not see the routing attribute (it would reach this object's state)
        routed = vars(layer).pop("forward", None)
        try:
            with span(f"trace {type(layer).__qualname__} (Dynamo, then its pieces' compile)"):
                region = self._trace_unbacked_else_backed(layer, forward, args, kwargs)
        finally:
            if routed is not None:
                layer.forward = routed
        wall = time.perf_counter() - t0
        region.report.dynamo_s = max(0.0, wall - region.report.compile_s)
        self.regions.append(region)
        if self.run is not None:
            self.run.new_regions.append(region)
            self.run.wall_s += wall
        if self.store is not None:
            with span(f"save program {type(layer).__qualname__}"):
                self.store.save(region)
        return region

    def _trace_unbacked_else_backed(self, layer: nn.Module, forward: Any, args: tuple[Any, ...],
                                    kwargs: dict[str, Any]) -> Region:
        """The layer's region, its token count unbacked (one trace for every count); if that trace
        fails on the count (the layer branches on it: a data-dependent guard or a graph break),
        traced again with the count backed, so each branch is a guard of the region (a count on
        the other side traces one more region) and the layer still runs as regions. A class that
        needed it is traced backed from then on (said in each of its regions' report notes)."""
        tokens = _STEP_TOKENS.get()
        marks_unbacked = self.dynamic_tokens and (tokens is None or tokens > 1)  # mark_token_dims_of's rule
        backed_why = self.backed_tokens.get(type(layer))
        if backed_why is None:
            try:
                return self._trace(layer, forward, args, kwargs, backed=False)
            except Exception as e:
                if not marks_unbacked or not _fails_on_token_count(e):
                    raise
                backed_why = f"{type(e).__name__}: {_first_line(e)}"
            logger.info("layerpass: %s cannot be traced with an unbacked token count (%s); tracing it with the "
                        "count backed (its branches on it are guards)", type(layer).__qualname__, backed_why)
        region = self._trace(layer, forward, args, kwargs, backed=True)
        self.backed_tokens[type(layer)] = backed_why
        region.report.notes.append(f"region of {type(layer).__qualname__}: token count backed (a region per "
                                   f"guarded range of it), its unbacked trace failed: {backed_why}")
        return region

    def _trace(self, layer: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
               backed: bool) -> Region:
        # trace on fresh copies: the caller's tensors are neither marked nor aliased by the trace
        example_args, example_kwargs = pytree.tree_map_only(torch.Tensor, _fresh_copy, (args, kwargs))
        if self.dynamic_tokens:
            mark_token_dims_of(example_args, example_kwargs, _STEP_TOKENS.get(), backed=backed)
        region, not_saveable = self._trace_ahead_of_time(layer, forward, example_args, example_kwargs)
        if region is None:
            region = self._trace_in_memory(layer, forward, example_args, example_kwargs, not_saveable)
        return region

    def _trace_ahead_of_time(self, layer: nn.Module, forward: Any, args: tuple[Any, ...],
                             kwargs: dict[str, Any]) -> tuple[Region | None, str]:
        """``aot_compile`` of the layer class's forward, with the guards torch drops recorded;
        ``(None, why)`` if torch cannot build a saveable program of this frame."""
        recorder = GuardRecorder()
        compiler = self.backend.for_layer()
        fn = compile_for_regions(forward, backend=compiler, fullgraph=True, options={"guard_filter_fn": recorder})
        try:
            # Dynamo is not thread-safe: trace as torch.compile does, under its compile lock (taken
            # last: another thread's trace may run while this one's recording is open)
            with recording_traced_code() as codes, saveable_guards(), dynamo_compile_lock():
                aot = fn.aot_compile(((layer, *args), kwargs))
        except _GRAPH_BREAKS:
            raise  # the layer cannot be traced whole: the model goes whole-model
        except Exception as e:  # torch cannot save this frame's guards (e.g. a local-scope class)
            if compiler.failure is not None:
                raise  # the layerpass backend failed: a bug, never taken for an unsaveable frame
            why = f"{type(e).__name__}: {_first_line(e)}"
            logger.info("layerpass: %s: no saveable program (%s); tracing it in memory", type(layer).__qualname__, why)
            return None, why
        if len(compiler.programs) != 1:
            raise RuntimeError(f"layerpass: tracing {type(layer).__qualname__}.forward called the backend "
                               f"{len(compiler.programs)} times, expected once")
        program = compiler.programs[0]
        deps = record_deps(codes, recorder.dropped, forward)
        return Region(aot.fn, aot, program, type(layer), self.signatures[id(layer)], deps, "compiled",
                      unsaved=None if deps.unsaveable is None else f"{type(layer).__qualname__}: {deps.unsaveable}"), ""

    def _trace_in_memory(self, layer: nn.Module, forward: Any, args: tuple[Any, ...],
                         kwargs: dict[str, Any], not_saveable: str) -> Region:
        """Dynamo's ordinary compile of the forward (its guards kept in memory, none dropped)."""
        compiler = self.backend.for_layer()
        fn = compile_for_regions(forward, backend=compiler, fullgraph=True, isolate_recompiles=True)
        fn(layer, *args, **kwargs)  # traces and compiles (the output of these copies is dropped)
        if not compiler.programs:
            raise RuntimeError(f"layerpass: Dynamo ran {type(layer).__qualname__}.forward without calling the backend")
        program = compiler.programs[-1]
        deps = record_deps(program.traced_code, [], forward)
        why = f"{type(layer).__qualname__}: torch cannot save its traced program ({not_saveable})"
        return Region(fn, None, program, type(layer), self.signatures[id(layer)], deps, "in memory", unsaved=why,
                      compiler=compiler)


# Dynamo's errors for a frame it cannot trace whole (a graph break under fullgraph=True)
_GRAPH_BREAKS = (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError)

# a trace that fails on an unbacked size: a guard on it or a symbol it made that no output binds
_DATA_DEPENDENT = (torch.fx.experimental.symbolic_shapes.GuardOnDataDependentSymNode,
                   torch.fx.experimental.symbolic_shapes.PendingUnbackedSymbolNotFound)


def _fails_on_token_count(error: BaseException) -> bool:
    """Whether a trace with the token count unbacked may succeed with it backed: a graph break
    (a branch on the count is one) or a data-dependent error, also wrapped by Dynamo or Inductor."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (*_GRAPH_BREAKS, *_DATA_DEPENDENT)):
            return True
        # Dynamo rewraps an error of its own trace as InternalTorchDynamoError "from None": the context
        e = e.__context__ if isinstance(e, torch._dynamo.exc.InternalTorchDynamoError) else e.__cause__
    return False


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
