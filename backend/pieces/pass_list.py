"""The passes a ``CompilationConfig`` turns on (``configure``), written as code, in one fixed order.

The list lives beside the config it reads, in the backend: ``passes/`` holds the pass framework
(``LayerpassPass``, ``PatternPass``, ``PassManager``) and the generic passes, ``patterns/`` the
fusions built on that framework, and this list picks from both (the folder rule:
``tests/layerpass/test_folder_rule.py``).
"""

from __future__ import annotations

from collections.abc import Callable

from layerpass.passes.base import LayerpassPass
from layerpass.passes.cleanup import DeadCodeEliminationPass
from layerpass.passes.fix_functionalization import FixFunctionalizationPass
from layerpass.passes.lowering import LoweringPass
from layerpass.passes.noop_elimination import NoOpEliminationPass
from layerpass.passes.pass_manager import PassManager
from layerpass.patterns.act_quant import ActQuantFusionPass
from layerpass.patterns.attn_quant import AttnQuantFusionPass
from layerpass.patterns.moe_quant_input import MoEQuantInputFusionPass
from layerpass.patterns.moe_shared import MoESharedFusionPass
from layerpass.patterns.norm_quant import NormQuantFusionPass

from ..config import CompilationConfig


def configure(config: CompilationConfig) -> list[LayerpassPass]:
    """The passes a ``CompilationConfig`` turns on, in the one fixed order:

    1. no-op elimination (``eliminate_noops``): reshapes/views/slices that change nothing, so
       the fusion patterns see the chains they are written for;
    2. fusions, one module each in ``layerpass.patterns``: attention+quant (``fuse_attn_quant``),
       norm+quant (``fuse_norm_quant``), act+quant (``fuse_act_quant``), MoE shared experts and
       MoE quantised input (both ``fuse_moe``);
    3. lowering (``custom_ops``): each lowerable layerpass op left unfused (norms, SiLU-and-mul,
       FP8 quant and matmul, the fused norm/act+quant ops) is replaced by its native torch code,
       which Inductor generates and fuses with its neighbours; omitted when ``custom_ops`` keeps
       every op custom;
    4. dead-code clean-up: the unfused producers the fusions left without users;
    5. fix functionalization, always last: ``auto_functionalized`` back to in-place calls so
       Inductor makes no copies.

    Out-of-tree passes join with ``PassManager.add_pass``."""
    lowered = config.lowered_ops()
    switched: list[tuple[bool, Callable[[], LayerpassPass]]] = [
        (config.eliminate_noops, NoOpEliminationPass),
        (config.fuse_attn_quant, AttnQuantFusionPass),
        (config.fuse_norm_quant, NormQuantFusionPass),
        (config.fuse_act_quant, ActQuantFusionPass),
        (config.fuse_moe, MoESharedFusionPass),
        (config.fuse_moe, MoEQuantInputFusionPass),
        (bool(lowered), lambda: LoweringPass(lowered)),
        (True, DeadCodeEliminationPass),
        (True, FixFunctionalizationPass),
    ]
    return [make() for on, make in switched if on]


def pass_manager_for(config: CompilationConfig) -> PassManager:
    """A ``PassManager`` running ``configure(config)``, its uuid keyed by the config's fingerprint."""
    return PassManager(configure(config), config.fingerprint())
