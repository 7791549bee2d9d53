"""Version-conditional registration: with ``VLLM_USE_LAYERNAME`` on, one registration per pattern
serves every layer; off, the layer name is a closure constant and each layer gets its own.

The switch is read at import, so the other setting runs in a fresh subprocess. The fast tests drive the
passes' ``prepare`` with the layer-name constants the backend would pass and apply the per-name
pattern to a captured graph; the slow ones compile real models (``bench/fusion_stats.py``).
"""

from __future__ import annotations

import pytest

from tests.helpers import backend as bh

def count_registrations() -> dict:
    """Patterns each pass registers for 2 and 32 layers, fed the ``str`` constants the backend would
    pass (one ``prepare`` per piece, each seeing its own layer's), under this process's switch."""
    import torch

    import layerpass
    from layerpass.backend.config import CompilationConfig
    from layerpass.ops.library import op_name
    from layerpass.passes.base import PieceContext
    from layerpass.backend.pieces.pass_list import configure

    lp = torch.ops.layerpass
    out = {}
    for layers in (2, 32):
        passes = configure(CompilationConfig())
        # described exactly as the backend describes a piece's str constants (op packet and overload)
        consts = [(f"n{i}", op_name(op, overload=True), f"model.layers.{i}.{suffix}")
                  for i in range(layers) for op, suffix in ((lp.unified_attention_with_output, "self_attn.attn"),
                                                             (lp.moe_forward.default, "mlp.experts"),
                                                             (lp.moe_forward_shared, "mlp.not_a_moe_forward"))]
        for piece in range(layers):
            for p in passes:
                p.prepare(PieceContext(str_constants=[c for c in consts if c[2].startswith(f"model.layers.{piece}.")]))
        out[str(layers)] = {p.name: p.registrations for p in passes}
    return {"use_layername": layerpass.USE_LAYERNAME, "counts": out}


def per_name_results() -> dict:
    """Switch off: the attention pattern registered for one layer name applied to a captured graph of
    layer 7, for layer 3's name and for layer 7's own."""
    import torch

    import layerpass
    from layerpass.ops import LayerRegistry, build_batch_metadata, layer_registry_scope, set_forward_context
    from layerpass.ops.library import op_name
    from layerpass.passes.base import PieceContext
    from layerpass.patterns.attn_quant import AttnQuantFusionPass
    from tests.helpers import fusion as fh
    from tests.patterns.test_patterns import AttnQuant

    registry = LayerRegistry("per-name")
    name = "model.layers.7.self_attn.attn"
    with layer_registry_scope(registry):
        m = AttnQuant(4, 2, 16, 0.05, torch.float32, name)
    md = build_batch_metadata([1, 4], [9, 0], [[0], [1]], 16)
    q, k, v = torch.randn(5, 64), torch.randn(5, 32), torch.randn(5, 32)
    with torch.no_grad(), set_forward_context(md, registry):
        eager = m(q, k, v)
    cap = fh.capture_graph(m, [q, k, v], metadata=md, registry=registry)
    results = {}
    for seen in ("model.layers.3.self_attn.attn", name):
        p = AttnQuantFusionPass()
        fused, matches = fh.apply_passes(cap.gm, [p], PieceContext(str_constants=[("n", op_name(torch.ops.layerpass.unified_attention_with_output), seen)]))
        with torch.no_grad(), set_forward_context(md, registry):
            out = cap.run(fused)
        results[seen] = {"matches": matches["fuse_attn_quant"], "registrations": p.registrations,
                         "equal": bool(torch.equal(fh.fp8_bits(out), fh.fp8_bits(eager)))}
    return {"use_layername": layerpass.USE_LAYERNAME, "results": results,
            "arg_types": [type(a).__name__ for a in cap.args]}


_OTHER_SETTING_BODY = """\
from tests.patterns import test_registrations as t
emit({{"counts": t.count_registrations(), "per_name": t.per_name_results() if {off} else None}})
"""


@pytest.fixture(scope="module")
def other_setting() -> dict:
    """The results under the switch setting this process does not run with, from ONE fresh process."""
    from layerpass.envs import USE_LAYERNAME

    switch = "0" if USE_LAYERNAME else "1"
    env = dict(bh.subprocess_env(), VLLM_USE_LAYERNAME=switch)
    body = _OTHER_SETTING_BODY.format(off=switch == "0")
    return bh.run_python(body, env=env, what=f"VLLM_USE_LAYERNAME={switch} process").result


def _under(switch: str, request: pytest.FixtureRequest, key: str, here) -> dict:
    """``here()`` when this process runs with ``switch``, else the fresh process's ``key`` result."""
    from layerpass.envs import USE_LAYERNAME

    if USE_LAYERNAME is (switch == "1"):
        return here()
    return request.getfixturevalue("other_setting")[key]


@pytest.mark.slow
@pytest.mark.parametrize("switch", ["1", "0"])
def test_registration_counts(switch, request) -> None:
    res = _under(switch, request, "counts", count_registrations)
    assert res["use_layername"] is (switch == "1")
    two, many = res["counts"]["2"], res["counts"]["32"]
    for name in ("fuse_norm_quant", "fuse_act_quant"):  # no layer name in these patterns
        assert two[name] == many[name] > 0
    if switch == "1":
        assert two == many and two["fuse_attn_quant"] == 1 and two["fuse_moe"] == 2  # moe: gated + ungated
    else:
        assert (two["fuse_attn_quant"], many["fuse_attn_quant"]) == (2, 32)
        assert (two["fuse_moe"], many["fuse_moe"]) == (4, 64)


def test_per_name_pattern_matches_only_its_layer(request) -> None:
    """Switch off: the pattern registered for layer 7's name fuses layer 7's chain; one registered
    for another layer's name does not (the name is part of the pattern, not a wildcard)."""
    res = _under("0", request, "per_name", per_name_results)
    assert res["use_layername"] is False and "LayerName" not in res["arg_types"]
    other, own = res["results"]["model.layers.3.self_attn.attn"], res["results"]["model.layers.7.self_attn.attn"]
    assert other == {"matches": 0, "registrations": 1, "equal": True}
    assert own == {"matches": 1, "registrations": 1, "equal": True}


@pytest.mark.slow
def test_registrations_compiled_models() -> None:
    """Real compiles: switch on, 2 vs 32 layers register the same number of patterns and every layer
    is fused; switch off (2 vs 4 layers: each layer is its own compile there), registrations grow."""
    from layerpass.bench.fusion_stats import measure

    on2, on32 = measure("llama-fp8", 2, True), measure("llama-fp8", 32, True)
    assert on2["use_layername"] and on2["registrations"] == on32["registrations"]
    assert on32["matches"]["fuse_attn_quant"] == 32 and on32["matches_compiled"] == on2["matches_compiled"]
    off2, off4 = measure("llama-fp8", 2, False), measure("llama-fp8", 4, False)
    assert not off2["use_layername"]
    assert (off2["registrations"]["fuse_attn_quant"], off4["registrations"]["fuse_attn_quant"]) == (2, 4)
    assert off4["matches"]["fuse_attn_quant"] == 4 and off4["matches_compiled"]["fuse_attn_quant"] == 4
    for r in (on2, on32, off2, off4):
        assert r["pass_failures"] == [] and r["max_abs_diff"] < 0.5
