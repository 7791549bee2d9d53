"""layerpass: torch.compile graph passes for LLM inference engines.

Top-level folders map into this namespace: ``layerpass.ops`` (custom ops),
``layerpass.layers`` (pluggable layers), ``layerpass.models`` (model zoo),
``layerpass.patterns`` / ``layerpass.passes`` (fusions and the compile backend),
``layerpass.bench`` (benchmarks).
"""

from .config import HAS_OPAQUE_TYPE, USE_LAYERNAME

__version__ = "0.1.0"
__all__ = ["HAS_OPAQUE_TYPE", "USE_LAYERNAME", "__version__"]
