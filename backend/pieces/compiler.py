"""The ``layerpass`` torch.compile backend: one Dynamo graph in, a ``PiecewiseProgram`` out.

Steps, each a method of ``LayerpassBackend``:

1. ``split_graph``: cut the graph into pieces (per decoder layer, or at splitting ops).
2. ``piece_key``: structural hash of each piece (nested bodies included) plus everything else
   the compiled code depends on (torch/layerpass versions, config, pass uuids, the switch).
3. ``get_or_compile``: one artifact per distinct key: this compile's, the on-disk cache's (or the
   remote store's), or a fresh Inductor compile (the pass manager as ``post_grad_custom_post_pass``),
   then stored. Processes sharing the cache dir take the key's lock first, so one of them
   compiles and the others wait and load ("waited").
4. ``install``: the piece's line in the ``CompileReport`` and a ``PieceRunner`` in its place.

``install_saved`` rebuilds a program read from disk (the warm start) through the same
``get_or_compile`` (load only: a missing artifact raises and the caller traces instead) and the
same ``install``, so static-size variants of loaded pieces compile with this backend's passes.

``layerpass.compile`` (``backend/compiled_model.py``) drives this backend per distinct decoder
layer (regions, ``for_layer``); ``torch.compile(model, backend="layerpass")`` drives it on the
whole model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx
from torch._guards import detect_fake_mode

from layerpass import envs, version
from layerpass.passes.base import PieceContext

from ..cache.artifacts import ArtifactCache, cache_key
from ..cache.location import CacheLocation, open_remote_store
from ..config import CompilationConfig
from .debug_compile import compile_aot_eager
from .isa_probe import inductor_isa_config, wait_for_cpu_isa_probe
from .pass_list import pass_manager_for
from .piece_hash import PieceSignature, piece_signature
from ..cache.private_files import atomic_write
from .program import PieceCall, PieceRunner, PiecewiseProgram
from ..report.compile_report import CompileReport, PieceInfo, publish
from .split import SplitResult, split_graph
from ..report.timeline import span
from ..token_dims import token_dims
from ..regions.trace_deps import traced_code_of_this_trace

logger = logging.getLogger("layerpass")


def walk_pieces(split_gm: fx.GraphModule, example_inputs: Sequence[Any],
                visit: Callable[[str, fx.GraphModule, fx.Node, tuple[Any, ...]], None]) -> None:
    """Call ``visit(name, submodule, call_node, fake_args)`` for each piece of the split graph,
    in graph order, with the fake values its arguments had when Dynamo traced it.

    The pieces are not run again: a fake run of a piece re-runs its data-dependent ops (an MoE's
    per-expert sizes via ``.tolist()``), making fresh unbacked symbols in Dynamo's shape env that
    no node binds; its compile, which shares that shape env, then fails
    (``PendingUnbackedSymbolNotFound``). Dynamo's own values carry the symbols the graph binds."""
    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is None:
        raise RuntimeError("layerpass: Dynamo passed no fake tensors to the backend; cannot walk the pieces")
    placeholders = [n for n in split_gm.graph.nodes if n.op == "placeholder"]
    known: dict[fx.Node, Any] = {
        node: fake_mode.from_tensor(t) if isinstance(t, torch.Tensor) else t
        for node, t in zip(placeholders, example_inputs)
    }
    for node in split_gm.graph.nodes:
        if node.op != "call_module":
            continue
        sub = getattr(split_gm, node.target)
        inputs = [n for n in sub.graph.nodes if n.op == "placeholder"]
        visit(node.target, sub, node, tuple(_traced_value(a, p, known) for a, p in zip(node.args, inputs)))


def _traced_value(arg: Any, placeholder: fx.Node, known: dict[fx.Node, Any]) -> Any:
    """A piece argument's fake value: the graph input's, else what Dynamo recorded for the node
    (``split_module`` copies it onto the piece's placeholder)."""
    if not isinstance(arg, fx.Node):
        return arg
    if arg in known:
        return known[arg]
    for key in ("example_value", "val"):
        if key in placeholder.meta:
            return placeholder.meta[key]
    raise RuntimeError(f"layerpass: piece input {placeholder.name!r} has no traced value (no example_value in its meta)")


def own_aliases(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``args`` and ``kwargs`` with each tensor replaced by a view of itself (same storage and
    autograd history, one Python object more), to be marked (``mark_token_dims``) instead of the
    caller's tensors: Dynamo keeps dynamism marks on the tensor object, and a caller reusing its
    tensors with another compiled model must not bring this model's marks along."""
    def alias(v: Any) -> Any:
        return v.view(v.shape) if isinstance(v, torch.Tensor) else v

    return tuple(alias(a) for a in args), {k: alias(v) for k, v in kwargs.items()}


def mark_token_dims(values: Sequence[Any]) -> None:
    """Mark dim 0 (tokens) of every tensor in ``values`` in a token layout (``token_dims.token_dims``)
    dynamic before a compiled call.

    Unbacked, not just dynamic: a backed size is specialised on 0/1, so a one-token step
    would recompile."""

    for a in values:
        if isinstance(a, torch.Tensor) and token_dims(a, None):
            torch._dynamo.decorators.mark_unbacked(a, 0)


def _stats_sidecar(key: str) -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return os.path.join(cache_dir(), "layerpass-stats", f"{key}.json")


def _token_arg(fake_args: Sequence[Any]) -> int | None:
    """The first input whose dim 0 is symbolic (the token count), for ``compile_sizes``."""
    return next((i for i, a in enumerate(fake_args) if isinstance(a, torch.Tensor) and a.dim() > 0
                 and isinstance(a.shape[0], torch.SymInt)), None)


@dataclasses.dataclass
class CompiledPiece:
    artifact: Any
    stats: dict[str, Any]


class LayerCompiler:
    """The backend for one region's traces (``LayerpassBackend.for_layer``): its graph is one
    decoder layer, one piece (a layer's own lists of heads or experts are not decoder layers);
    it keeps the programs it returned, so the caller gets its own program, not a shared "last"."""

    def __init__(self, backend: LayerpassBackend) -> None:
        self.backend = backend
        self.programs: list[PiecewiseProgram] = []
        self.failure: BaseException | None = None  # what the backend raised (aot_compile passes it on unwrapped)

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> PiecewiseProgram:
        try:
            program = self.backend.compile_graph(gm, example_inputs, whole_layer=True)
        except torch._dynamo.exc.RestartAnalysis:
            # Dynamo's request to trace again (e.g. a float it made dynamic must be specialised:
            # TensorifyScalarRestartAnalysis), not a failure of this backend
            raise
        except BaseException as e:
            self.failure = e
            raise
        self.programs.append(program)
        return program


class LayerpassBackend:
    """A torch.compile backend object; ``torch.compile(m, backend=LayerpassBackend(cfg))``."""

    def __init__(self, config: CompilationConfig | None = None, publish_reports: bool = True) -> None:
        self.config = config or CompilationConfig()
        import layerpass.ops  # noqa: F401  (the default splitting ops must be registered)

        for name in self.config.splitting_ops:
            namespace, op = name.split(".")
            try:
                getattr(getattr(torch.ops, namespace), op)
            except (AttributeError, RuntimeError):
                raise ValueError(f"splitting op {name!r} is not a registered torch op; register it before "
                                 f"compiling, or drop it from CompilationConfig.splitting_ops") from None
        self.pass_manager = pass_manager_for(self.config)
        remote = open_remote_store(self.config.remote_cache) if self.config.caches_pieces else None
        self.location = CacheLocation(self.config.cache_dir, remote, self.config.lock_timeout_s)  # type: ignore[arg-type]
        self.cache = ArtifactCache(self.location)
        self.publish_reports = publish_reports
        self.num_calls = 0
        # whole-model graphs, told apart by Dynamo's compile id: a frame seen before is a recompile,
        # a new frame after the first a graph-break continuation (its resume function)
        self.num_recompiles = 0
        self._frames: set[int] = set()
        self.last_report: CompileReport | None = None
        # key -> artifact, across this backend's graphs: regions of one model share pieces
        self.compiled: dict[str, CompiledPiece] = {}

    def for_layer(self) -> LayerCompiler:
        """This backend for the traces of one region (a graph that is one decoder layer)."""
        return LayerCompiler(self)

    def key_parts(self) -> dict[str, Any]:
        """Everything besides the piece's own structure that its compiled code depends on."""
        return dict(layerpass=version.__version__, torch=torch.__version__, config=self.config.fingerprint(),
                    passes=self.pass_manager.uuid(), use_layername=envs.USE_LAYERNAME)

    # -- the backend ----------------------------------------------------------------
    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> PiecewiseProgram:
        return self.compile_graph(gm, example_inputs)

    def compile_graph(self, gm: fx.GraphModule, example_inputs: Sequence[Any], whole_layer: bool = False) -> PiecewiseProgram:
        t_enter = time.perf_counter()
        self.num_calls += 1
        if not whole_layer:
            self._count_frame()
        # Dynamo has traced: now Inductor (a piece's compile or load) needs the ISA probe's answer
        wait_for_cpu_isa_probe()
        cfg = self.config
        # Dynamo's own time is measured by whoever drives it (layerpass.compile); 0 under a bare torch.compile
        report = CompileReport(split=cfg.split, recompiles=self.num_recompiles,
                               graph_breaks=max(0, len(self._frames) - 1), compiler=cfg.compiler)
        result = split_graph(gm, cfg.split, cfg.splitting_ops, whole_layer=whole_layer)
        if cfg.split == "ops" and cfg.fuse_attn_quant:
            report.notes.append("split='ops': the splitting ops run eagerly, so no fusion can cross them (attention+quant is off)")
        split_gm = result.graph_module
        key_parts = self.key_parts()
        calls: dict[str, PieceCall] = {}
        # piece inputs that are graph inputs map to the real tensors/objects (for passes that check identity)
        real_of = dict(zip([n for n in split_gm.graph.nodes if n.op == "placeholder"], example_inputs))

        def visit(target: str, sub: fx.GraphModule, node: fx.Node, args: tuple[Any, ...]) -> None:
            if target in result.eager_pieces:
                report.num_eager_pieces += 1
                report.pieces.append(PieceInfo(target, "eager", None, result.piece_layers.get(target), "eager"))
                return
            sig, key = self.piece_key(sub, args, key_parts)
            context = PieceContext(target, result.piece_layers.get(target), sig.constants,
                                   [real_of.get(a) if isinstance(a, fx.Node) else None for a in node.args])
            piece, source = self.get_or_compile(key, lambda: self._compile_piece(target, sub, list(args), context), target)
            calls[target] = PieceCall(key, _single_output(sub), _token_arg(args), len(node.args))
            self.install(split_gm, result, target, piece, source, calls[target], report, sig)

        walk_pieces(split_gm, example_inputs, visit)
        report.num_unique_pieces = len({c.key for c in calls.values()})
        report.compile_s = time.perf_counter() - t_enter
        report.total_s = report.dynamo_s + report.compile_s
        self.last_report = report
        if self.publish_reports:
            publish(report)
        split_gm.recompile()
        state = {"config": dataclasses.asdict(cfg), "whole_layer": whole_layer}
        program = PiecewiseProgram(split_gm, gm, calls, state, report)
        program.traced_code = traced_code_of_this_trace()
        return program

    def _count_frame(self) -> None:
        """Count this graph as a recompile or as a new frame (graph break); without a Dynamo
        compile id (a direct call), every call after the first is a recompile."""
        compile_id = torch._guards.CompileContext.current_compile_id()
        frame = getattr(compile_id, "frame_id", None)
        if frame is None:
            self.num_recompiles += self.num_calls > 1
        elif frame in self._frames:
            self.num_recompiles += 1
        else:
            self._frames.add(frame)

    def install_saved(self, gm: fx.GraphModule, calls: dict[str, PieceCall],
                      state: dict[str, Any]) -> tuple[fx.GraphModule, CompileReport]:
        """Rebuild a saved program: split ``gm`` as it was split when compiled and put each
        piece's artifact (this backend's, or the on-disk cache's) in its place. Raises if the
        split differs from the saved one or an artifact is missing."""
        config = CompilationConfig(**state["config"])
        result = split_graph(gm, config.split, config.splitting_ops, whole_layer=state.get("whole_layer", False))
        split_gm = result.graph_module
        names = [name for name, _ in split_gm.named_children() if name not in result.eager_pieces]
        if set(names) != set(calls):
            raise ValueError(f"saved program's pieces {sorted(calls)} do not match its graph's split {sorted(names)}")
        num_args = {n.target: len(n.args) for n in split_gm.graph.nodes if n.op == "call_module"}
        wrong = [name for name in names if calls[name].num_args != num_args.get(name)]
        if wrong:
            raise ValueError(f"saved program's pieces {wrong} took other arguments when compiled "
                             f"({[calls[n].num_args for n in wrong]}) than its graph's split gives them "
                             f"({[num_args.get(n) for n in wrong]})")
        report = CompileReport(split=config.split, compiler=config.compiler)
        for name in names:
            piece, source = self.get_or_compile(calls[name].key, None)
            self.install(split_gm, result, name, piece, source, calls[name], report, None)
        report.num_eager_pieces = len(result.eager_pieces)
        report.num_unique_pieces = len({calls[n].key for n in names})
        split_gm.recompile()
        return split_gm, report

    # -- steps ----------------------------------------------------------------------
    def piece_key(self, sub: fx.GraphModule, args: Sequence[Any], key_parts: dict[str, Any]) -> tuple[PieceSignature, str]:
        sig = piece_signature(sub, args)
        return sig, cache_key(piece=sig.key, **key_parts)

    def get_or_compile(self, key: str, compile_piece: Callable[[], tuple[Any, dict[str, Any]]] | None,
                       piece: str = "") -> tuple[CompiledPiece, str]:
        """The one path to a piece's artifact: this backend's ("shared"), else the cache's
        ("cache": the local dir, "remote": the remote store), else ``compile_piece()``
        ("compiled"), stored for the next process. Processes sharing the cache dir hold the key's
        lock while compiling: a process that waited for another loads what it stored ("waited").
        Without ``compile_piece`` (loading a saved program) a missing artifact raises."""
        if key in self.compiled:
            return self.compiled[key], "shared"
        found = self._load_stored(key)
        if found is not None:
            return found
        if compile_piece is None:
            raise FileNotFoundError(f"compiled piece {key[:12]} is not in the artifact cache {self.config.cache_dir}")
        if not self.config.caches_pieces:
            return self._compile_and_store(key, compile_piece, piece), "compiled"
        with self.location.hold(key, f"compiling piece {piece or key[:12]}") as lock:
            if lock.waited:  # another process held the key: it has most likely stored the piece
                found = self._load_stored(key)
                if found is not None:
                    return found[0], "waited"
            return self._compile_and_store(key, compile_piece, piece), "compiled"

    def _load_stored(self, key: str) -> tuple[CompiledPiece, str] | None:
        entry = self.cache.load(key) if self.config.caches_pieces else None
        if entry is None:
            return None
        self.compiled[key] = CompiledPiece(entry.artifact, entry.meta.get("stats", {}))
        return self.compiled[key], entry.meta.get("source", "cache")

    def _compile_and_store(self, key: str, compile_piece: Callable[[], tuple[Any, dict[str, Any]]],
                           piece: str) -> CompiledPiece:
        artifact, stats = compile_piece()
        if self.config.compiler == "inductor":
            stats = self._resolve_stats(key, stats)
        self.compiled[key] = CompiledPiece(artifact, stats)
        if self.config.caches_pieces:
            self.cache.store(key, artifact, {"stats": stats, "piece": piece, "torch": torch.__version__})
        return self.compiled[key]

    def install(self, split_gm: fx.GraphModule, split: SplitResult, name: str, piece: CompiledPiece, source: str,
                call: PieceCall, report: CompileReport, sig: PieceSignature | None) -> None:
        """Count piece ``name`` in ``report`` and put its runner in the split graph; its static-size
        variants compile with this backend (its passes) on first use."""
        first_here = call.key not in {p.key for p in report.pieces}
        constants, shape_key = ([], None) if sig is None else (sig.constants, sig.shape_key)
        report.add_piece(PieceInfo(name, "compiled", call.key, split.piece_layers.get(name), source, constants, shape_key),
                         piece.stats, first_here=first_here)
        sub = getattr(split_gm, name)
        layer = split.piece_layers.get(name)

        def compile_static(real_args: list[Any]) -> Callable[..., Any]:
            # the piece's real arguments are its placeholders' values (LayerName objects included);
            # a loaded piece's str constants (VLLM_USE_LAYERNAME=0 patterns) are read off its graph
            consts = constants if sig is not None else piece_signature(sub, real_args).constants
            context = PieceContext(name, layer, consts, list(real_args))
            return self._compile_piece(f"{name}-static", sub, real_args, context, static=True)[0]

        setattr(split_gm, name, PieceRunner(piece.artifact, call.single_output, call.token_arg, compile_static,
                                            self.config.compile_sizes))

    # -- Inductor ---------------------------------------------------------------------
    def _inductor_options(self) -> dict[str, Any]:
        patches = {
            "post_grad_custom_post_pass": self.pass_manager,
            # keep v1 auto_functionalized so patterns see one form (scoped to this compile)
            "enable_auto_functionalized_v2": False,
        }
        patches.update(self.config.inductor_options)
        return {"config_patches": patches}

    def _compile_piece(self, name: str, gm: fx.GraphModule, args: list[Any], context: PieceContext,
                       static: bool = False) -> tuple[Any, dict[str, Any]]:
        # a static variant specialises on the real args; otherwise reuse Dynamo's symbolic shapes
        dynamic_shapes = "from_example_inputs" if static else "from_tracing_context"
        wait_for_cpu_isa_probe()  # (a static variant compiled at run time, after no other piece)
        compiler = self.config.compiler
        with span(f"compile piece {name} ({compiler})"), inductor_isa_config(), \
                self.pass_manager.piece(name, context) as run:
            if compiler == "eager":  # the piece's Dynamo graph as traced (debug_compile.py)
                artifact: Any = gm
            elif compiler == "aot_eager":
                artifact = compile_aot_eager(gm, args, self._inductor_options()["config_patches"], static)
            else:
                artifact = torch._inductor.standalone_compile(gm, args, dynamic_shapes=dynamic_shapes,
                                                              options=self._inductor_options())
        return artifact, run.as_dict()

    def _resolve_stats(self, key: str, stats: dict[str, Any]) -> dict[str, Any]:
        """Inductor may serve a piece from its own cache without running our passes; the
        stats of the run that did are kept in a sidecar next to Inductor's cache."""
        path = _stats_sidecar(key)
        if stats.get("passes_ran"):
            with contextlib.suppress(OSError):
                atomic_write(path, json.dumps(stats).encode())
            return stats
        with contextlib.suppress(OSError, ValueError):
            with open(path) as f:
                return json.load(f)
        logger.info("layerpass: Inductor served a piece from its cache; pass stats unavailable for it")
        return stats


def _single_output(sub: fx.GraphModule) -> bool:
    out_node = next(n for n in reversed(sub.graph.nodes) if n.op == "output")
    return isinstance(out_node.args[0], fx.Node)


# One backend per default config in effect (the environment is read at each compile, never
# frozen at the first): graphs compiled under the same settings share their pieces in memory.
# For one backend per model, pass ``backend=LayerpassBackend(config)`` or use ``layerpass.compile``.
_DEFAULT_BACKENDS: dict[str, LayerpassBackend] = {}


def layerpass_backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    """The ``backend="layerpass"`` entry point (a default ``CompilationConfig``, read now)."""
    config = CompilationConfig()
    key = f"{config.fingerprint()}|{config.cache_dir}|{config.remote_cache}|{config.lock_timeout_s}"
    backend = _DEFAULT_BACKENDS.get(key)
    if backend is None:
        backend = _DEFAULT_BACKENDS[key] = LayerpassBackend(config)
    return backend(gm, example_inputs)
