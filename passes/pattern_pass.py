"""``PatternPass``: the base of the fusion passes, on Inductor's own pattern matcher.

Each fusion is one module in ``layerpass.patterns``: its pattern, replacement, example
inputs, extra checks and a ``PatternPass`` subclass that registers them. This base owns the
``PatternMatcherPass``, registers under a ``FakeTensorMode`` (tracing never runs a real
kernel) and makes the version-conditional choice for patterns that name a layer, once:

- ``USE_LAYERNAME``: the layer name is a pattern input (a hoisted ``LayerName``), so ONE
  registration of the body matches every layer;
- otherwise the name is a ``str`` constant in the graph: the SAME body is bound to each
  layer's name (``partial_pattern``) and registered once per layer name found in the pieces
  being compiled (``prepare`` receives the piece's ``str`` constants).

A body names a layer when it has a ``layer_name`` parameter; its example inputs leave that
parameter out (the base adds it).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

from layerpass import envs
from layerpass.ops.layer_name import LayerName, resolve_layer_name
from layerpass.ops.library import op_name
from layerpass.ops.layer_lookup import tracing_pattern_examples

from .base import LayerpassPass, PieceContext, current_piece

if TYPE_CHECKING:
    from torch._inductor.pattern_matcher import Match, PatternMatcherPass

logger = logging.getLogger("layerpass")

LAYER_NAME_ARG = "layer_name"


def partial_pattern(fn: Callable[..., Any], **bound: Any) -> Callable[..., Any]:
    """``functools.partial(fn, **bound)`` whose ``__signature__`` drops the bound parameters.

    ``register_replacement`` reads a pattern's inputs from its signature, so a bound parameter
    becomes a constant of the traced pattern (the idea of PyTorch's
    ``partialize_and_update_signature``). Arguments are passed on by name, so a parameter in
    the middle of the signature can be bound too."""
    sig = inspect.signature(fn)
    unknown = set(bound) - set(sig.parameters)
    if unknown:
        raise TypeError(f"{fn.__name__} has no parameter(s) {sorted(unknown)}")
    new_sig = sig.replace(parameters=[p for name, p in sig.parameters.items() if name not in bound])
    call = functools.partial(fn, **bound)

    def bound_fn(*args: Any, **kwargs: Any) -> Any:
        return call(**new_sig.bind(*args, **kwargs).arguments)

    bound_fn.__signature__ = new_sig  # type: ignore[attr-defined]
    bound_fn.__name__ = bound_fn.__qualname__ = getattr(fn, "__name__", "pattern")
    bound_fn.__module__ = fn.__module__
    return bound_fn


class PatternPass(LayerpassPass):
    """A fusion pass: one ``PatternMatcherPass`` filled by ``register_patterns`` (patterns that
    name no layer) and ``register_layer_patterns(layer_name)`` (patterns that do; ``layer_name``
    is ``None`` with LayerName, else one layer's ``str``), both called from ``prepare``."""

    #: the op whose layer-name argument the name-bearing patterns match (a packet or "namespace.op")
    named_op: ClassVar[Any] = None

    def __init__(self) -> None:
        super().__init__()
        self._patterns: PatternMatcherPass | None = None
        self._registered = False
        self._names: set[str] = set()

    @property
    def patterns(self) -> PatternMatcherPass:
        """Built on first use: Inductor's pattern matcher is imported only when a piece is compiled
        (a warm start that loads every piece never imports it)."""
        if self._patterns is None:
            from torch._inductor.pattern_matcher import PatternMatcherPass

            self._patterns = PatternMatcherPass(pass_name=f"layerpass_{self.name}")
        return self._patterns

    # -- what a fusion module overrides ---------------------------------------------------
    def register_patterns(self) -> None:
        """Register the patterns that name no layer."""

    def register_layer_patterns(self, layer_name: str | None) -> None:
        """Register the patterns that name a layer with ``self.register(..., layer_name=layer_name)``."""

    # -- registration -----------------------------------------------------------------------
    def register(self, pattern: Callable[..., Any], replacement: Callable[..., Any],
                 example_inputs: Callable[[], list[Any]], *, layer_name: str | None = None,
                 extra_check: Callable[..., bool] | None = None, **kwargs: Any) -> None:
        """``register_replacement`` into this pass. For a body with a ``layer_name`` parameter,
        ``layer_name=None`` keeps it a pattern input and a ``str`` binds it in pattern and
        replacement; its ``extra_check(match, layer_name)`` gets the matched layer's name."""
        scalars = kwargs.get("scalar_workaround") or {}
        names = [p for p in inspect.signature(pattern).parameters if p not in scalars]
        if LAYER_NAME_ARG in names:
            make_examples = example_inputs
            if layer_name is None:
                def example_inputs() -> list[Any]:
                    args = list(make_examples())
                    args.insert(names.index(LAYER_NAME_ARG), LayerName("example"))
                    return args
            else:
                pattern = partial_pattern(pattern, **{LAYER_NAME_ARG: layer_name})
                replacement = partial_pattern(replacement, **{LAYER_NAME_ARG: layer_name})
            if extra_check is not None:
                extra_check = self._with_layer_name(extra_check, layer_name)
        elif layer_name is not None:
            raise TypeError(f"{self.name}: pattern {pattern.__name__} has no {LAYER_NAME_ARG!r} parameter to bind")
        if extra_check is not None:
            kwargs["extra_check"] = extra_check
        from torch._inductor.pattern_matcher import fwd_only, register_replacement

        with FakeTensorMode(), tracing_pattern_examples():  # example shapes: no layer's checks apply
            register_replacement(pattern, replacement, example_inputs(), fwd_only, self.patterns, **kwargs)
        self.registrations += 1

    def _with_layer_name(self, check: Callable[[Match, str], bool], bound: str | None) -> Callable[[Match], bool]:
        def extra_check(match: Match) -> bool:
            try:
                if bound is not None:
                    return bool(check(match, bound))
                value = self.real_input(match.kwargs.get(LAYER_NAME_ARG))
                return value is not None and bool(check(match, resolve_layer_name(value)))
            except Exception as e:  # unresolvable: do not fuse
                logger.info("layerpass: %s: not fusing (%s: %s)", self.name, type(e).__name__, e)
                return False

        return extra_check

    def real_input(self, node: Any) -> Any:
        """The real value behind a placeholder of the piece being compiled (``current_piece()``), else None."""
        if not isinstance(node, fx.Node) or node.op != "placeholder":
            return None
        placeholders = [n for n in node.graph.nodes if n.op == "placeholder"]
        real = current_piece().real_inputs
        idx = placeholders.index(node)
        return real[idx] if idx < len(real) else None

    # -- the version-conditional choice, made once -----------------------------------------
    def config_key(self) -> str:
        return f"use_layername={envs.USE_LAYERNAME}"

    def prepare(self, context: PieceContext) -> None:
        if not self._registered:
            self._registered = True
            self.register_patterns()
            if self.named_op is not None and envs.USE_LAYERNAME:
                self.register_layer_patterns(None)  # the name is a pattern input: one registration, every layer
        if self.named_op is not None and not envs.USE_LAYERNAME:
            named = op_name(self.named_op)
            for _, target, value in context.str_constants:
                if op_name(target) == named and value not in self._names:
                    self._names.add(value)
                    self.register_layer_patterns(value)  # the name is a constant: one registration per layer

    def apply(self, graph: fx.Graph) -> int:
        return int(self.patterns.apply(graph) or 0)

