"""Converted HF models run their modules' own forwards, not ``kernels``' per-model routing wrappers.

transformers (5.2x, with the ``kernels`` package installed) decorates module-level functions with
``@use_kernel_forward_from_hub`` (``modeling_llama.apply_rotary_pos_emb`` becomes an instance of a
class defined inside ``kernels``' ``_create_func_module``, an ``nn.Module`` that calls the function)
and the modules calling them with ``@use_kernelized_func(fn)``: every module instance gets private
copies of those wrappers (``module._kernel_funcs``), and its class's ``forward`` becomes a wrapper
that routes the global wrapper's calls to the private copies while the module runs, so that
``kernels.kernelize(model)`` can swap a hub kernel in per model.

Dynamo traces through that routing and guards on the private copies (attributes of the layer):
their class is defined in local scope, so ``aot_compile`` refuses to build saveable guards (``...
cannot be saved into torch.compile() package since it's defined in local scope``) and the region
cannot be saved. A converted model does not kernelize (its attention, norms, linears and
MLPs are layerpass layers), and until a wrapper is kernelized the routing changes nothing: the
private copy runs the same function the global wrapper runs. So ``bypass_kernel_routing`` binds
each such module's ``forward`` to the forward the wrapper wraps, an instance attribute (the class,
the wrappers and transformers' module globals are untouched; other models of the same class keep
the routing). The module then calls the global wrapper, which calls the plain function: the same
computation. A module whose wrappers (its private copies or the global ones its forward calls)
are kernelized keeps the routing (the model still runs and compiles; only its region cannot be
saved). Saving a region through such an instance ``forward`` needs ``backend/regions/guard_pickling.py``
(torch 2.13 restores a method bound in an instance's ``__dict__`` as the class's method).

``from_transformers`` is to call it on the converted base model, next to ``_run_base_model_undecorated``.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Iterable, Iterator

from torch import nn


def _nested_codes(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _nested_codes(const)


@functools.cache
def _routing_codes() -> frozenset[types.CodeType]:
    """The code objects of the functions ``kernels.use_kernelized_func`` makes (the routing
    ``forward`` among them); empty without ``kernels``."""
    try:
        from kernels import use_kernelized_func
    except Exception:  # not installed, or an import error inside it: nothing was decorated by it
        return frozenset()
    code = getattr(use_kernelized_func, "__code__", None)
    return frozenset(_nested_codes(code)) if code is not None else frozenset()


def routed_forward(module: nn.Module) -> types.FunctionType | None:
    """The forward that ``kernels``' routing wrapper of ``type(module).forward`` wraps, or None when
    the class's forward is not such a wrapper (or an instance ``forward`` already shadows it)."""
    if "forward" in vars(module) or not isinstance(vars(module).get("_kernel_funcs"), dict):
        return None
    forward = getattr(type(module), "forward", None)
    code = getattr(forward, "__code__", None)
    inner = getattr(forward, "__wrapped__", None)
    if code is None or code not in _routing_codes() or not isinstance(inner, types.FunctionType):
        return None
    return inner


def _kernelized(wrapper: object) -> bool:
    """Whether ``kernels.kernelize`` replaced this wrapper's forward (an instance ``forward``)."""
    return isinstance(wrapper, nn.Module) and "forward" in vars(wrapper)


def bypass_kernel_routing(root: nn.Module) -> list[str]:
    """Bind, on every module of ``root`` whose class forward is ``kernels``' routing wrapper and
    none of whose private wrappers is kernelized, ``forward`` to the wrapped forward (see the
    module docstring). Returns the paths of the modules changed."""
    changed = []
    for path, module in root.named_modules():
        inner = routed_forward(module)
        if inner is None:
            continue
        private = vars(module)["_kernel_funcs"].values()
        shared = _globals_called(inner, private)
        if any(_kernelized(w) for w in (*private, *shared)):
            continue
        module.forward = types.MethodType(inner, module)
        changed.append(path)
    return changed


def _globals_called(inner: types.FunctionType, private: Iterable[object]) -> list[object]:
    """The module-level wrappers the wrapped forward calls in place of the private copies: the
    globals of its module (past other decorators, e.g. ``deprecate_kwarg``) of a private copy's class."""
    classes = {type(w) for w in private}
    return [v for v in inspect.unwrap(inner).__globals__.values() if type(v) in classes]
