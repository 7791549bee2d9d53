"""``layerpass.compile(model)``: the model compiled per distinct decoder layer, warm-startable.

With repeated layers (and an AOT-capable torch) the compiled model runs the model's own
forward, and each layer call goes to its *region* (``backend/regions/router.py``): Dynamo traces each
distinct layer once, the backend compiles each distinct piece once, and the traced programs are
saved (``backend/regions/warm_start.py``) so a new process loads them instead of tracing. Without
repeated layers, or if a layer cannot be traced whole (a graph break), the whole model goes
through ``torch.compile`` with the same backend, as ``backend="layerpass"`` does; the report
says which and why.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch
from torch import nn

from layerpass.torch_compat import aot_api_missing, region_per_layer

from .pieces.compiler import LayerpassBackend, mark_token_dims, own_aliases
from .config import CompilationConfig
from .pieces.isa_probe import probe_cpu_isa_in_background
from .regions.router import Regions, RegionsRun, find_layer_container
from .token_dims import token_dims
from .report.compile_report import CompileReport, publish
from .report.timeline import Timeline, span
from .regions.warm_start import ProgramStore

logger = logging.getLogger("layerpass")


class CompiledModel(nn.Module):
    """What ``layerpass.compile`` returns; call it like the model.

    With ``dynamic_tokens`` the token dimension is symbolic (unbacked): a new token count, one
    token included, never recompiles."""

    def __init__(self, model: nn.Module, config: CompilationConfig) -> None:
        super().__init__()
        self._created = time.perf_counter()  # the first call's timeline starts at the compile call
        self.model = model
        self.config = config
        self.backend = LayerpassBackend(config, publish_reports=False)
        self.regions: Regions | None = None
        self.compiled: Any = None
        self.trace_note = ""
        self.warm_start_off = ""  # the whole-model report's warm_start when it is off for a reason
        self.num_calls = 0
        self._region_calls_with_new = 0
        self._reported_eager: set[int] = set()  # layers whose eager fallback a published report named
        # one call at a time: regions route the shared layer modules, and a first call traces
        self._lock = threading.RLock()
        self._warned_training = False
        # the compile call's own work, put on the first call's timeline (it starts at the compile call)
        self._first_timeline = Timeline(self._created)
        with self._first_timeline, span("start the ISA probe (or read its saved answer)"):
            probe_cpu_isa_in_background(model, None if config.disable_cache else str(config.cache_dir))
        start = time.perf_counter()
        container = find_layer_container(model)
        if container is None:
            self._whole_model("no repeated layers (no ModuleList of two or more modules)")
        elif (missing := aot_api_missing()) is not None:
            self.warm_start_off = f"off: {missing}"
            self._whole_model(f"{missing}, so it cannot trace a layer ahead of time")
        else:
            self.regions = Regions(container, self.backend, None, config.dynamic_tokens, root=model)
        self._first_timeline.add("find the layers, their structure signatures", start, time.perf_counter())

    def _whole_model(self, why: str) -> None:
        self.trace_note = why
        self.backend.publish_reports = True
        self.compiled = torch.compile(self.model, backend=self.backend)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from .inputs import check_model_inputs  # a bad step input: ValueError before Dynamo sees it
        check_model_inputs(self.model, args, kwargs)
        with self._lock:
            self.num_calls += 1
            timeline = self._first_timeline if self.num_calls == 1 else Timeline(time.perf_counter())
            with timeline:
                if self.regions is not None and self.regions.failed is None and not self._training():
                    return self._run_regions(args, kwargs, timeline)
                if self.compiled is None:  # regions are inference-only: training compiles the whole model
                    self._whole_model("the model is in training mode (regions are inference-only)")
                return self._run_whole_model(args, kwargs, timeline)

    def _training(self) -> bool:
        if not self.model.training:
            return False
        if not self._warned_training:
            self._warned_training = True
            logger.warning("layerpass: the model is in training mode; regions (and the warm start) are inference-only, "
                           "so the whole model is compiled with torch.compile for training-mode calls; call .eval() "
                           "for the region path")
        return True

    def _run_whole_model(self, args: tuple[Any, ...], kwargs: dict[str, Any], timeline: Timeline) -> Any:
        if self.config.dynamic_tokens and not self.model.training:
            # (training-mode ops such as dropout guard on the token count: left to Dynamo's dynamism)
            args, kwargs = own_aliases(args, kwargs)  # marked, never the caller's tensors
            mark_token_dims([*args, *kwargs.values()])
        calls, t0 = self.backend.num_calls, time.perf_counter()
        out = self.compiled(*args, **kwargs)
        end = time.perf_counter()
        wall = end - t0
        if self.backend.num_calls == 0:
            # Dynamo gave up before reaching the backend (e.g. its recompile limit for this
            # forward's code object): the model ran eagerly. Say so instead of pretending.
            raise RuntimeError(
                "layerpass: torch.compile ran the model eagerly without calling the layerpass backend "
                f"(Dynamo recompile limit {torch._dynamo.config.recompile_limit} reached for this forward, or "
                "compilation disabled); raise torch._dynamo.config.recompile_limit or call torch.compiler.reset()"
            )
        if self.backend.num_calls > calls and self.backend.last_report is not None:
            report = self.backend.last_report
            report.notes.append(f"whole model traced: {self.trace_note}")
            if self.warm_start_off:
                report.warm_start = self.warm_start_off
            # Dynamo's share: the traced call's wall time less the backend's (and one run of the program)
            report.dynamo_s = max(0.0, wall - report.compile_s)
            report.total_s = report.dynamo_s + report.compile_s
            timeline.add("whole model: Dynamo, its pieces' compile, one run", t0, end)
            report.timeline = timeline.spans
        return out

    def _run_regions(self, args: tuple[Any, ...], kwargs: dict[str, Any], timeline: Timeline) -> Any:
        assert self.regions is not None
        if self.regions.store is None and self.config.caches_pieces:
            # keyed at the first call, so passes added after compile() (add_pass) are in the key
            with span("model key (warm-start store)"):
                self.regions.store = ProgramStore(self.backend.location, self.model, self.backend.key_parts())
        notes = self.regions.begin_step()
        tokens = _token_count(args, kwargs)
        start = time.perf_counter()
        with self.regions.installed(tokens) as run:
            out = self.model(*args, **kwargs)
        timeline.add("the model's call (its layers' regions: traced, loaded or run)", start, time.perf_counter())
        run.notes.extend(notes)
        if self.regions.failed is not None:
            # this step ran that layer (and the ones after it) eagerly; from the next step on, whole model
            logger.warning("layerpass: %s; compiling the whole model instead", self.regions.failed)
            report = self._regions_report(run, timeline)
            report.trace = "eager (this step; whole-model from the next)"
            report.notes.append(self.regions.failed)
            publish(report)
            self._whole_model(self.regions.failed)
            return out
        if run.new_regions or notes or self.num_calls == 1 or run.eager_layers.keys() - self._reported_eager:
            self._reported_eager |= run.eager_layers.keys()
            if run.new_regions:
                self._region_calls_with_new += 1
            publish(self._regions_report(run, timeline))
        return out

    def _regions_report(self, run: RegionsRun, timeline: Timeline) -> CompileReport:
        """This call's report: each layer's use of its region merged in, what obtaining a region
        cost counted at its first use in the call that traced or loaded it."""
        assert self.regions is not None
        report = CompileReport(split=self.config.split, trace="regions", compiler=self.config.compiler,
                               recompiles=max(0, self._region_calls_with_new - 1))
        report.num_regions = len({id(r) for _, r in run.layer_regions} | {id(r) for r in self.regions.last.values()})
        store = self.regions.store
        report.warm_start = store.status if store is not None else (
            "off (disable_cache=True)" if self.config.disable_cache
            else f"off (compiler={self.config.compiler!r}: a debug compiler caches nothing)")
        new = {id(r) for r in run.new_regions}
        for index, region in run.layer_regions:
            report.merge(region.report, layer=index, fresh=id(region) in new)
            new.discard(id(region))
        report.total_s = run.wall_s if run.new_regions else 0.0
        report.notes.extend(run.notes)
        report.eager_layers = dict(sorted(run.eager_layers.items()))
        if (why := region_per_layer()) is not None:
            report.notes.append(why)
        report.timeline = timeline.spans
        return report

    @property
    def recompiles(self) -> int:
        if self.regions is not None and self.compiled is None:
            return max(0, self._region_calls_with_new - 1)
        return self.backend.num_recompiles  # graph-break continuations are not recompiles


def _token_count(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The step's token count: dim 0 of the first tensor input in a token layout (``input_ids [T]``)."""
    for value in [*args, *kwargs.values()]:
        if isinstance(value, torch.Tensor) and token_dims(value, None):
            return int(value.shape[0])
    return None


def compile(model: nn.Module, config: CompilationConfig | None = None) -> CompiledModel:
    """Compile ``model`` with the layerpass backend; call the result like the model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"layerpass.compile needs a torch.nn.Module (a model whose forward runs the step), got "
                        f"{type(model).__name__} {_short_repr(model)}; for a plain function use "
                        f"torch.compile(fn, backend='layerpass')")
    if config is not None and not isinstance(config, CompilationConfig):
        raise TypeError(f"layerpass.compile: config must be a CompilationConfig or None, got {type(config).__name__}; "
                        f"e.g. layerpass.CompilationConfig(split='ops')")
    return CompiledModel(model, config or CompilationConfig())


def _short_repr(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 60 else text[:57] + "..."
