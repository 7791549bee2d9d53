"""layerpass: torch.compile graph passes for LLM inference engines.

Top-level folders map into this namespace: ``layerpass.ops`` (custom ops),
``layerpass.layers`` (pluggable layers), ``layerpass.patterns`` (the fusions, one module
each), ``layerpass.passes`` (the pass manager and the graph passes), ``layerpass.backend``
(``layerpass.compile``: regions, the piecewise backend, caches and the warm start),
``layerpass.models`` (the zoo and Hugging Face conversion), ``layerpass.bench`` (benchmarks).

``layerpass.compile``, ``CompilationConfig`` and ``last_compile_report`` are imported
lazily so ``import layerpass`` stays cheap.
"""

from typing import Any

from .envs import HAS_OPAQUE_TYPE, USE_LAYERNAME
from .version import __version__

_LAZY = {
    "compile": ("layerpass.backend.compiled_model", "compile"),
    "CompilationConfig": ("layerpass.backend.config", "CompilationConfig"),
    "last_compile_report": ("layerpass.backend.report.compile_report", "last_compile_report"),
    "CompileReport": ("layerpass.backend.report.compile_report", "CompileReport"),
}
__all__ = ["HAS_OPAQUE_TYPE", "USE_LAYERNAME", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'layerpass' has no attribute {name!r}")
