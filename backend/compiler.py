"""The ``layerpass`` torch.compile backend.

Dynamo graph -> split into pieces (``passes.split``) -> structural hash per piece
(``passes.piece_hash``) -> one Inductor compile per unique piece (pass manager as
``post_grad_custom_post_pass``), or a load from the on-disk cache -> the split graph
calls the shared compiled artifacts; splitting ops ("ops" mode) run eagerly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch._guards import detect_fake_mode

import layerpass

from .cache import ArtifactCache, cache_key
from .config import CompilationConfig
from layerpass.passes.pass_manager import PassManager
from .piece_hash import piece_signature
from .report import CompileReport, PieceInfo, publish
from .split import SplitResult, split_graph

logger = logging.getLogger("layerpass")

_dynamo_start: list[float] = [0.0]


def _on_dynamo_start(*_args: Any) -> None:
    _dynamo_start[0] = time.perf_counter()


torch._dynamo.callback.on_compile_start(_on_dynamo_start)


def walk_pieces(split_gm: fx.GraphModule, example_inputs: Sequence[Any],
                visit: Callable[[str, fx.GraphModule, fx.Node, tuple[Any, ...]], None]) -> None:
    """Run the split graph on fake copies of Dynamo's example inputs, calling
    ``visit(name, submodule, call_node, fake_args)`` after each piece has produced its output."""
    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is None:
        raise RuntimeError("layerpass: Dynamo passed no fake tensors to the backend; cannot walk the pieces")
    fake_args = [fake_mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in example_inputs]

    class Walker(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            self.current = n
            return super().run_node(n)

        def call_module(self, target: str, args: Any, kwargs: Any) -> Any:
            sub = getattr(split_gm, target)
            out = super().call_module(target, args, kwargs)
            visit(target, sub, self.current, args)
            return out

    with fake_mode:
        Walker(split_gm).run(*fake_args)


def mark_token_dims(values: Sequence[Any]) -> None:
    """Mark dim 0 (tokens) of every tensor in ``values`` dynamic before a compiled call.

    Unbacked, not just dynamic: a backed size is specialised on 0/1, so a one-token step
    would recompile."""
    for a in values:
        if isinstance(a, torch.Tensor) and a.dim() > 0:
            torch._dynamo.decorators.mark_unbacked(a, 0)


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
        if self.compile_sizes and self.token_arg is not None:
            n = int(args[self.token_arg].shape[0])
            if n in self.compile_sizes:
                if n not in self.static:
                    self.static[n] = self.compile_static(list(args))  # type: ignore[misc]
                fn = self.static[n]
        out = fn(*args)
        if self.single_output and isinstance(out, (list, tuple)):
            return out[0]
        return tuple(out) if isinstance(out, list) else out


def _stats_sidecar(key: str) -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return os.path.join(cache_dir(), "layerpass-stats", f"{key}.json")


class LayerpassBackend:
    """A torch.compile backend object; ``torch.compile(m, backend=LayerpassBackend(cfg))``."""

    def __init__(self, config: CompilationConfig | None = None) -> None:
        self.config = config or CompilationConfig()
        import layerpass.ops  # noqa: F401  (the default splitting ops must be registered)

        for name in self.config.splitting_ops:
            namespace, op = name.split(".")
            try:
                getattr(getattr(torch.ops, namespace), op)
            except (AttributeError, RuntimeError):
                raise ValueError(f"splitting op {name!r} is not a registered torch op; register it before "
                                 f"compiling, or drop it from CompilationConfig.splitting_ops") from None
        self.pass_manager = PassManager.from_config(self.config)
        self.cache = ArtifactCache(self.config.cache_dir)  # type: ignore[arg-type]
        self.num_calls = 0

    # -- Inductor ---------------------------------------------------------------------
    def _inductor_options(self) -> dict[str, Any]:
        patches = {
            "post_grad_custom_post_pass": self.pass_manager,
            # keep v1 auto_functionalized so patterns see one form (scoped to this compile)
            "enable_auto_functionalized_v2": False,
        }
        patches.update(self.config.inductor_options)
        return {"config_patches": patches}

    def _compile_piece(self, name: str, gm: fx.GraphModule, args: list[Any], context: dict[str, Any],
                       static: bool = False) -> tuple[Any, dict[str, Any]]:
        self.pass_manager.begin_piece(name, context)
        runs = self.pass_manager.runs
        # a static variant specialises on the real args; otherwise reuse Dynamo's symbolic shapes
        dynamic_shapes = "from_example_inputs" if static else "from_tracing_context"
        artifact = torch._inductor.standalone_compile(gm, args, dynamic_shapes=dynamic_shapes,
                                                      options=self._inductor_options())
        ran = self.pass_manager.runs > runs
        stats = {"passes": {k: dict(v) for k, v in self.pass_manager.stats.items()},
                 "failures": list(self.pass_manager.failures), "passes_ran": ran}
        return artifact, stats

    # -- the backend ----------------------------------------------------------------
    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        t_enter = time.perf_counter()
        dynamo_s = max(0.0, t_enter - _dynamo_start[0]) if _dynamo_start[0] else 0.0
        self.num_calls += 1
        cfg = self.config
        report = CompileReport(split=cfg.split, recompiles=self.num_calls - 1, dynamo_s=dynamo_s)
        result: SplitResult = split_graph(gm, cfg.split, cfg.splitting_ops)
        if cfg.split == "ops" and cfg.fuse_attn_quant:
            report.notes.append("split='ops': the splitting ops run eagerly, so no fusion can cross them (attention+quant is off)")
        key_parts = dict(layerpass=layerpass.__version__, torch=torch.__version__, config=cfg.fingerprint(),
                         passes=self.pass_manager.uuid(), use_layername=layerpass.USE_LAYERNAME)
        split_gm = result.graph_module
        compiled: dict[str, tuple[Any, dict[str, Any]]] = {}  # key -> (artifact, stats) within this compile
        # piece inputs that are graph inputs map to the real tensors/objects (for passes that check identity)
        split_placeholders = [n for n in split_gm.graph.nodes if n.op == "placeholder"]
        real_of = dict(zip(split_placeholders, example_inputs))

        def visit(target: str, sub: fx.GraphModule, node: fx.Node, args: tuple[Any, ...]) -> None:
            layer = result.piece_layers.get(target)
            if target in result.eager_pieces:
                report.num_eager_pieces += 1
                report.pieces.append(PieceInfo(target, "eager", None, layer, "eager"))
                return
            sig = piece_signature(sub, args)
            key = cache_key(piece=sig.key, **key_parts)
            info = PieceInfo(target, "compiled", key, layer, constants=sig.constants, shape_key=sig.shape_key)
            real_inputs = [real_of.get(a) if isinstance(a, fx.Node) else None for a in node.args]
            context = {"str_constants": sig.constants, "piece": target, "layer": layer, "real_inputs": real_inputs}
            if key in compiled:
                info.source = "shared"
            else:
                entry = None if cfg.disable_cache else self.cache.load(key)
                if entry is not None:
                    compiled[key] = (entry.artifact, entry.meta.get("stats", {}))
                    info.source = "cache"
                    report.num_cache_hits += 1
                else:
                    artifact, stats = self._compile_piece(target, sub, list(args), context)
                    stats = self._resolve_stats(key, stats)
                    compiled[key] = (artifact, stats)
                    info.source = "compiled"
                    report.num_compiled += 1
                    for name, s in stats.get("passes", {}).items():
                        report.matches_compiled[name] = report.matches_compiled.get(name, 0) + int(s["matches"])
                        report.pass_time_s[name] = report.pass_time_s.get(name, 0.0) + float(s["time_s"])
                    report.pass_failures.extend(stats.get("failures", []))
                    if not cfg.disable_cache:
                        self.cache.store(key, artifact, {"stats": stats, "piece": target, "torch": torch.__version__})
            artifact, stats = compiled[key]
            for name, s in stats.get("passes", {}).items():
                report.matches[name] = report.matches.get(name, 0) + int(s["matches"])
                report.registrations[name] = max(report.registrations.get(name, 0), int(s.get("registrations", 0)))
            report.num_pieces += 1
            report.pieces.append(info)
            setattr(split_gm, target, self._runner(sub, args, artifact, target, context))

        walk_pieces(split_gm, example_inputs, visit)
        report.num_unique_pieces = len(compiled)
        report.compile_s = time.perf_counter() - t_enter
        report.total_s = report.dynamo_s + report.compile_s
        publish(report)
        split_gm.recompile()
        return split_gm.forward

    def _resolve_stats(self, key: str, stats: dict[str, Any]) -> dict[str, Any]:
        """Inductor may serve a piece from its own cache without running our passes; the
        stats of the run that did are kept in a sidecar next to Inductor's cache."""
        path = _stats_sidecar(key)
        if stats.get("passes_ran"):
            with contextlib.suppress(OSError):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.{os.getpid()}.tmp"
                with open(tmp, "w") as f:
                    json.dump(stats, f)
                os.replace(tmp, path)
            return stats
        with contextlib.suppress(OSError, ValueError):
            with open(path) as f:
                return json.load(f)
        logger.info("layerpass: Inductor served a piece from its cache; pass stats unavailable for it")
        return stats

    def _runner(self, sub: fx.GraphModule, fake_args: Sequence[Any], artifact: Any, name: str,
                context: dict[str, Any]) -> PieceRunner:
        out_node = next(n for n in reversed(sub.graph.nodes) if n.op == "output")
        single = isinstance(out_node.args[0], fx.Node)
        token_arg = next((i for i, a in enumerate(fake_args) if isinstance(a, torch.Tensor) and a.dim() > 0
                          and isinstance(a.shape[0], torch.SymInt)), None)
        def compile_static(real_args: list[Any]) -> Callable[..., Any]:
            return self._compile_piece(f"{name}-static", sub, real_args, context, static=True)[0]

        return PieceRunner(artifact, single, token_arg, compile_static, self.config.compile_sizes)


_default_backend: LayerpassBackend | None = None


def layerpass_backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    """The ``backend="layerpass"`` entry point (default ``CompilationConfig``)."""
    global _default_backend
    if _default_backend is None:
        _default_backend = LayerpassBackend()
    return _default_backend(gm, example_inputs)


class CompiledModel(nn.Module):
    """What ``layerpass.compile`` returns: the model compiled with a layerpass backend.

    With ``dynamic_tokens`` the first dimension of every tensor input is marked dynamic
    (unbacked) before each call, so a new token count, one token included, never recompiles."""

    def __init__(self, model: nn.Module, config: CompilationConfig) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.backend = LayerpassBackend(config)
        self.compiled = torch.compile(model, backend=self.backend)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.config.dynamic_tokens:
            mark_token_dims([*args, *kwargs.values()])
        out = self.compiled(*args, **kwargs)
        if self.backend.num_calls == 0:
            # Dynamo gave up before reaching the backend (e.g. its recompile limit for this
            # forward's code object): the model ran eagerly. Say so instead of pretending.
            raise RuntimeError(
                "layerpass: torch.compile ran the model eagerly without calling the layerpass backend "
                f"(Dynamo recompile limit {torch._dynamo.config.recompile_limit} reached for this forward, or "
                "compilation disabled); raise torch._dynamo.config.recompile_limit or call torch._dynamo.reset()"
            )
        return out

    @property
    def recompiles(self) -> int:
        return max(0, self.backend.num_calls - 1)


def compile(model: nn.Module, config: CompilationConfig | None = None) -> CompiledModel:
    """Compile ``model`` with the layerpass backend; call the result like the model."""
    return CompiledModel(model, config or CompilationConfig())
