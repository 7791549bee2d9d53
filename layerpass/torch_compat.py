"""What differs between the torch releases layerpass supports (2.11 to 2.14): the one place.

Everything else behaves the same on every supported torch. Two things differ:

- **The layer-name registration** (``LayerName`` as a hoisted opaque constant):

  | torch | function | ``typ`` | the class must be |
  | --- | --- | --- | --- |
  | 2.14 | ``register_custom_class`` (``register_opaque_type`` logs that it is deprecated) | ``"constant"`` (``"value"`` logs that it is deprecated) | any class |
  | 2.12, 2.13 | ``register_opaque_type`` | ``"value"`` | any class |
  | 2.11 | ``register_opaque_type`` | ``"value"`` | an instance of ``torch._opaque_base.OpaqueBaseMeta`` (2.11 checks it for every type; 2.12 only for reference types), with ``members={"value": USE_REAL}`` |
  | older, or no ``hoist`` | none: layer names stay ``str`` | | |

  ``torch._opaque_base`` is imported on 2.11 only: on 2.14 importing it logs a deprecation. 2.11
  hands fake kernels a ``FakeScriptObject`` in place of a value-type object (2.12 on: the object
  itself), so the one attribute they read, ``LayerName.value``, is declared a member.
- **``torch.compile`` for a region** (``compile_for_regions``): 2.11 gives a compiled function its
  ``aot_compile`` only under ``torch._dynamo.config.enable_aot_compile`` (on by default from 2.12),
  and has no ``isolate_recompiles`` (an in-memory region then shares Dynamo's cache entries of the
  layer's ``forward`` with the other regions of that class; their guards still decide).
- **One region per layer on 2.11** (``region_per_layer``): 2.11's Dynamo guards on the ``str`` a
  ``LayerName`` is built from inside ``forward`` (2.13 hoists it without a guard), so no two
  layers pass each other's region guards: each decoder layer is traced once, into its own region;
  identical pieces still compile once (the piece hash) and the warm start still loads. The report's
  notes say so. (Measured on 2.11 and 2.13; 2.12 is assumed to behave as 2.13.)
- **A module as ``assume_constant_result``'s argument** (``CONSTANT_OF_MODULE``): 2.12 on, Dynamo
  passes the real module (with an ID_MATCH guard); 2.11 accepts only Python constants and tensors
  and fails the trace (``UnspecializedNNModuleVariable ... is not a constant``). So on 2.11 a
  function of a model (``ops.step_inputs.max_position``) is traced through instead of run.
- **The AOT precompile** the regions and the warm start use (``torch.compile(...).aot_compile``,
  ``torch.compiler.load_compiled_function``): every supported torch has it; where a torch does not,
  ``layerpass.compile`` compiles the whole model and the report's ``warm_start`` says
  ``"off: torch X.Y lacks ..."`` (``aot_api_missing``).
"""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

SUPPORTED = ((2, 11), (2, 14))  # oldest and newest supported (major, minor), both included


def torch_version(version: str | None = None) -> tuple[int, int]:
    """``(major, minor)`` of ``version`` (default: this torch), e.g. ``"2.11.0+cu130"`` -> ``(2, 11)``."""
    text = torch.__version__ if version is None else version
    m = re.match(r"(\d+)\.(\d+)", text)
    if m is None:
        raise ValueError(f"cannot read a torch version from {text!r}; expected 'MAJOR.MINOR...', e.g. '2.13.0'")
    return int(m.group(1)), int(m.group(2))


TORCH_VERSION: tuple[int, int] = torch_version()
TORCH_MAJOR_MINOR: str = "%d.%d" % TORCH_VERSION


@dataclass(frozen=True)
class OpaqueApi:
    """How this torch registers a hoisted opaque constant type."""

    register: Callable[..., None]  # torch's registration function
    typ: str  # its name for a value-like (constant) type
    metaclass: type  # what a registered class must be an instance of
    members: dict[str, Any] = field(default_factory=dict)  # attributes fake kernels read (2.11)

    def __call__(self, cls: type) -> None:
        self.register(cls, typ=self.typ, hoist=True, **({"members": self.members} if self.members else {}))


def opaque_api(version: tuple[int, int] = TORCH_VERSION) -> OpaqueApi | None:
    """This torch's registration (table above), or None where it cannot hoist an opaque type."""
    try:
        opaque_object = importlib.import_module("torch._library.opaque_object")
    except ImportError:
        return None
    register = getattr(opaque_object, "register_custom_class", None)
    typ = "constant"
    if register is None:
        register = getattr(opaque_object, "register_opaque_type", None)
        typ = "value"
    if register is None or "hoist" not in inspect.signature(register).parameters:
        return None
    if version < (2, 12):
        from torch._opaque_base import OpaqueBaseMeta

        return OpaqueApi(register, typ, OpaqueBaseMeta, {"value": opaque_object.MemberType.USE_REAL})
    return OpaqueApi(register, typ, type)


_OPAQUE_API = opaque_api()
HAS_OPAQUE_TYPE: bool = _OPAQUE_API is not None
# ``class LayerName(metaclass=LAYER_NAME_METACLASS)``: what torch 2.11's registration demands
LAYER_NAME_METACLASS: type = type if _OPAQUE_API is None else _OPAQUE_API.metaclass


def register_layer_name(cls: type) -> None:
    """Register ``cls`` as a hoisted opaque constant type the way this torch wants it."""
    if _OPAQUE_API is None:
        raise RuntimeError(f"torch {torch.__version__} cannot hoist an opaque type; layer names stay str here")
    _OPAQUE_API(cls)


def is_hoisted_constant(cls: type) -> bool:
    """Whether ``cls`` is registered as a hoisted opaque constant (value) type."""
    if _OPAQUE_API is None:
        return False
    from torch._library import opaque_object

    is_constant = getattr(opaque_object, "is_opaque_constant_type", None) or opaque_object.is_opaque_value_type
    return bool(is_constant(cls)) and bool(opaque_object.should_hoist(cls))


def aot_api_missing() -> str | None:
    """What this torch lacks of the AOT precompile (None: it has all of it). The regions and the
    warm start need a traced function that can be saved and loaded back."""
    missing = []
    try:
        from torch._dynamo.aot_compile import AOTCompiledFunction  # noqa: F401
        from torch._dynamo.aot_compile_types import SerializableCallable  # noqa: F401
    except ImportError:
        missing.append("torch._dynamo.aot_compile (torch.compile(...).aot_compile)")
    if not hasattr(torch.compiler, "load_compiled_function"):
        missing.append("torch.compiler.load_compiled_function")
    if not missing:
        return None
    return f"torch {TORCH_MAJOR_MINOR} lacks {' and '.join(missing)}"


def has_aot_api() -> bool:
    """Whether this torch can trace a layer ahead of time and save and load the traced program."""
    return aot_api_missing() is None



def compile_for_regions(fn: Callable[..., Any], **options: Any) -> Any:
    """``torch.compile(fn, **options)`` with ``.aot_compile`` on every supported torch;
    ``isolate_recompiles`` is dropped where this torch lacks it (module docstring)."""
    if "isolate_recompiles" in options and "isolate_recompiles" not in inspect.signature(torch.compile).parameters:
        options.pop("isolate_recompiles")
    if getattr(torch._dynamo.config, "enable_aot_compile", True) is False:
        with torch._dynamo.config.patch(enable_aot_compile=True):
            return torch.compile(fn, **options)
    return torch.compile(fn, **options)


# ``torch.compiler.assume_constant_result`` may take an ``nn.Module`` argument (module docstring)
CONSTANT_OF_MODULE: bool = TORCH_VERSION >= (2, 12)


def region_per_layer() -> str | None:
    """Why every decoder layer is its own region on this torch (None: layers share regions)."""
    if TORCH_VERSION < (2, 12):
        return (f"torch {TORCH_MAJOR_MINOR}: Dynamo guards on the str each LayerName is built from, so every "
                "decoder layer is its own region (traced once each; identical pieces still compile once)")
    return None
