"""torch's AOT precompile, as regions and the warm start use it: the one module that touches it.

Public API where torch has one: ``torch.compile(fn, ...).aot_compile(...)`` traces, the
returned function's ``save_compiled_function`` writes it and ``torch.compiler.load_compiled_function``
reads it back. The compiled program is the layerpass backend's own object: at trace time the
caller gets it from the backend (``LayerCompiler.programs``), at load time from
``program.loading_programs``. What has no public API is here and only here: the fast guard
check on a layer call (torch's guard manager on arguments bound without ``inspect``; the public
``guard_check`` binds with ``inspect.Signature`` on every call), so a torch upgrade touches one place.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..pieces.program import PiecewiseProgram, loading_programs


def save(aot: Any, path: str, external_data: dict[str, Any]) -> None:
    """Write the traced function ``aot`` to ``path`` (torch writes a temporary file and renames it);
    ``external_data`` are the objects saved by reference, supplied again to ``load``."""
    aot.save_compiled_function(path, external_data)


def load(path: str, f_globals: dict[str, Any], external_data: dict[str, Any]) -> tuple[Any, PiecewiseProgram]:
    """The traced function saved at ``path`` and the layerpass program inside it (its pieces are
    loaded later, on first use)."""
    with loading_programs() as programs, open(path, "rb") as f:
        aot = torch.compiler.load_compiled_function(f, f_globals=f_globals, external_data=external_data)
    if len(programs) != 1:
        raise TypeError(f"{path} holds {len(programs)} layerpass programs, expected one")
    return aot, programs[0]


class ArgBinder:
    """Binds ``(layer, *args, **kwargs)`` to a forward's parameter names, as
    ``inspect.Signature.bind`` + ``apply_defaults`` do, without their per-call cost when the
    forward has plain parameters, then optionally ``*args`` and ``**kwargs`` (the usual case:
    Hugging Face decoder layers are traced through a ``(self, *args, **kwargs)`` wrapper);
    anything else (keyword-only parameters) goes through ``inspect``.
    ``cells``: a decorated forward's closure (name, cell), locals of the traced frame too."""

    def __init__(self, signature: inspect.Signature, cells: tuple[tuple[str, Any], ...] = ()) -> None:
        self.signature = signature
        self.cells = cells
        params = list(signature.parameters.values())
        self.var_keyword = params.pop().name if params and params[-1].kind is params[-1].VAR_KEYWORD else None
        self.var_positional = params.pop().name if params and params[-1].kind is params[-1].VAR_POSITIONAL else None
        plain = all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.POSITIONAL_ONLY) for p in params)
        self.names = tuple(p.name for p in params) if plain else None
        self.known = frozenset(p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD)
        self.positional_only = frozenset(p.name for p in params if p.kind is p.POSITIONAL_ONLY)
        self.defaults = {p.name: p.default for p in params if p.default is not p.empty}

    def bind(self, layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The traced frame's locals for this call (what the guards read)."""
        if self.cells:
            bound = {name: cell.cell_contents for name, cell in self.cells}
            bound.update(self._bind_args(layer, args, kwargs))
            return bound
        return self._bind_args(layer, args, kwargs)

    def _bind_args(self, layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        bound = self._bind_fast(layer, args, kwargs)
        if bound is not None:
            return bound
        arguments = self.signature.bind(layer, *args, **kwargs)  # an unusual call, or inspect's error
        arguments.apply_defaults()
        return dict(arguments.arguments)

    def _bind_fast(self, layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
        names = self.names
        if names is None:
            return None
        given = (layer, *args)
        if len(given) > len(names) and self.var_positional is None:
            return None
        bound = dict(zip(names, given))
        extra = {}
        for k, v in kwargs.items():
            if k in bound or k in self.positional_only:
                return None  # two values for one parameter: inspect's error
            if k not in self.known:
                extra[k] = v
        if extra and self.var_keyword is None:
            return None
        for name in names[len(given):]:
            if name in kwargs:
                bound[name] = kwargs[name]
            elif name in self.defaults:
                bound[name] = self.defaults[name]
            else:
                return None  # a missing argument: inspect's error
        if self.var_positional is not None:
            bound[self.var_positional] = given[len(names):]
        if self.var_keyword is not None:
            bound[self.var_keyword] = extra
        return bound


class GuardCheck:
    """Whether a traced function's guards pass for ``(layer, *args, **kwargs)``: torch's guard
    manager on the arguments bound by an ``ArgBinder``, as ``AOTCompiledFunction.guard_check``
    does without its per-call ``inspect`` binding."""

    def __init__(self, aot: Any) -> None:
        artifacts = aot._artifacts  # no public accessor for the guard manager, signature and closure
        self.guards = artifacts.guard_manager
        env = artifacts.runtime_env
        closure = getattr(env, "closure", None) or ()
        freevars = getattr(getattr(env, "bytecode", None), "co_freevars", ()) if closure else ()
        self.binder = ArgBinder(artifacts.signature, tuple(zip(freevars, closure)))

    def bind(self, layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        return self.binder.bind(layer, args, kwargs)

    def check(self, f_locals: dict[str, Any]) -> bool:
        return bool(self.guards.check(f_locals))
