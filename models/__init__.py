"""layerpass.models: the model zoo (``build_model``) and batch construction (``make_step``).

Zoo modules register themselves with ``@register_model(name)`` on import; optional modules
owned elsewhere (``bailing.py``) are imported when present.
"""

import importlib
import importlib.util

from .allocator import IdAllocator
from .common import CausalLM, DecoderLayer, DecoderModel, LlamaAttention, LlamaMLP
from .config import ModelConfig
from .registry import build_model, register_model, registered_models
from .step import Request, Step, make_step

from . import llama, moe  # noqa: E402,F401  (register "llama", "llama-fp8", "moe")

for _optional in ("bailing", "hf"):
    if importlib.util.find_spec(f"{__name__}.{_optional}") is not None:
        importlib.import_module(f"{__name__}.{_optional}")

from .hf import from_config, from_transformers  # noqa: E402  (transformers itself is imported lazily)

__all__ = [
    "IdAllocator", "CausalLM", "DecoderLayer", "DecoderModel", "LlamaAttention", "LlamaMLP", "ModelConfig",
    "build_model", "from_config", "from_transformers", "register_model", "registered_models", "Request", "Step", "make_step",
]
