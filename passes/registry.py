"""The fixed pass order, built from a ``CompilationConfig``.

1. no-op elimination  2. fusions (attention+quant, norm+quant, act+quant, MoE)
3. dead-code clean-up 4. fix functionalization (always last: it turns
``auto_functionalized`` back into in-place calls so Inductor makes no copies).
"""

from __future__ import annotations

import importlib
import logging

from .base import LayerpassPass
from layerpass.backend.config import CompilationConfig

logger = logging.getLogger("layerpass")

# (config switch or None for always-on, "module:Class")
PASS_ORDER: list[tuple[str | None, str]] = [
    ("eliminate_noops", "layerpass.passes.noop_elimination:NoOpEliminationPass"),
    ("fuse_attn_quant", "layerpass.passes.fusion:AttnQuantFusionPass"),
    ("fuse_norm_quant", "layerpass.passes.fusion:NormQuantFusionPass"),
    ("fuse_act_quant", "layerpass.passes.fusion:ActQuantFusionPass"),
    ("fuse_moe", "layerpass.passes.fusion:MoEFusionPass"),
    ("fuse_moe", "layerpass.passes.fusion:MoEQuantInputFusionPass"),
    (None, "layerpass.passes.cleanup:DeadCodeEliminationPass"),
    (None, "layerpass.passes.fix_functionalization:FixFunctionalizationPass"),
]


def build_passes(config: CompilationConfig) -> list[LayerpassPass]:
    passes: list[LayerpassPass] = []
    for switch, spec in PASS_ORDER:
        if switch is not None and not getattr(config, switch):
            continue
        module_name, cls_name = spec.split(":")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError) as e:
            logger.debug("layerpass: pass %s not available (%s)", spec, e)
            continue
        passes.append(cls())
    return passes
