"""The pass list (``backend/pieces/pass_list.py``): one fixed order, each config switch turning its passes
off, and the pass manager built from a config keyed by its fingerprint."""

from __future__ import annotations

from layerpass.backend.config import CompilationConfig
from layerpass.backend.pieces.pass_list import configure, pass_manager_for

ORDER = ["noop_elimination", "fuse_attn_quant", "fuse_norm_quant", "fuse_act_quant", "fuse_moe", "fuse_moe_quant_input",
         "lowering", "dead_code_elimination", "fix_functionalization"]
SWITCHES = {"eliminate_noops": ["noop_elimination"], "fuse_attn_quant": ["fuse_attn_quant"],
            "fuse_norm_quant": ["fuse_norm_quant"], "fuse_act_quant": ["fuse_act_quant"],
            "fuse_moe": ["fuse_moe", "fuse_moe_quant_input"]}


def test_configure_order_and_switches() -> None:
    assert [p.name for p in configure(CompilationConfig())] == ORDER
    for switch, names in SWITCHES.items():
        assert [p.name for p in configure(CompilationConfig(**{switch: False}))] == [n for n in ORDER if n not in names]
    assert [p.name for p in configure(CompilationConfig(custom_ops=("all",)))] == [n for n in ORDER if n != "lowering"]
    all_off = CompilationConfig(**{switch: False for switch in SWITCHES}, custom_ops=("all",))
    assert [p.name for p in configure(all_off)] == ["dead_code_elimination", "fix_functionalization"]
    pm = pass_manager_for(CompilationConfig())
    assert [p.name for p in pm.passes] == ORDER and pm.config_fingerprint == CompilationConfig().fingerprint()
    assert pm.uuid() != pass_manager_for(CompilationConfig(fuse_moe=False)).uuid()
