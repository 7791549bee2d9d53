"""The lowering pass (``passes/lowering.py``): each lowerable layerpass op left after the fusions
becomes native aten code Inductor generates and fuses; attention / MoE stay custom ops.

- ``CompilationConfig.custom_ops`` (vLLM's spelling) resolves to the ops lowered; bad entries are a
  ``ValueError`` naming them and the allowed names; the choice is in the pass's ``uuid()`` and in
  the pass manager's, so it changes every cache key.
- Each op on a small captured post-grad graph (hypothesis varies shapes, dtypes, scales): the node
  is gone (auto_functionalized form included), the graph equals the op's eager output.
- All ops compiled through the layerpass backend with a symbolic (unbacked) token count: lowered,
  equal to eager at the tests' tolerances, for several token counts with one compile.
- Real compiled pieces of zoo models: lowerable op nodes counted right before and after the pass
  (probes around it), the count is ``CompileReport.matches["lowering"]``; fusions fire as before;
  outputs match eager.
"""

from __future__ import annotations

import operator

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import fx, nn

from layerpass.backend.config import CompilationConfig
from layerpass.backend.pieces.pass_list import configure, pass_manager_for
from layerpass.ops import FP8_DTYPE
from layerpass.ops.custom_ops import resolve_custom_ops
from layerpass.ops.library import OPS, always_custom_ops, lowerable_ops, op_name, split_point_ops
from layerpass.passes.cleanup import DeadCodeEliminationPass
from layerpass.passes.fix_functionalization import FixFunctionalizationPass
from layerpass.passes.lowering import LoweringPass
from tests.helpers import backend as bh
from tests.helpers import fusion as fh
from tests.helpers.fp8 import assert_fp8_close

lp = torch.ops.layerpass
LOWERABLE_OPS = lowerable_ops()  # the ops defined with lowers=True (sorted)
LOWERABLE_TARGETS = {getattr(lp, n).default for n in LOWERABLE_OPS}
SETTINGS = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                    phases=(Phase.explicit, Phase.reuse, Phase.generate))


# ----------------------------------------------------------------------------- config


def test_custom_ops_resolution() -> None:
    everything = LOWERABLE_OPS
    assert CompilationConfig().custom_ops == ("none",)
    assert CompilationConfig().lowered_ops() == everything
    cases = {
        (): everything,
        ("none",): everything,
        ("all",): (),
        ("all", "-rms_norm"): ("rms_norm",),
        ("all", "-silu_and_mul", "-rms_norm"): ("rms_norm", "silu_and_mul"),  # sorted
        ("+silu_and_mul",): tuple(n for n in everything if n != "silu_and_mul"),
        ("none", "+rms_norm", "-fused_add_rms_norm"): tuple(n for n in everything if n != "rms_norm"),
        ("-rms_norm", "-rms_norm"): everything,
    }
    for spec, lowered in cases.items():
        assert resolve_custom_ops(spec) == lowered, spec
        assert CompilationConfig(custom_ops=spec).lowered_ops() == lowered, spec
    assert CompilationConfig(custom_ops=["all", "-rms_norm"]).custom_ops == ("all", "-rms_norm")  # a list is taken


@pytest.mark.parametrize("spec, words", [
    (("bogus",), ["'bogus'", "'none', 'all', '+name'", "rms_norm", "silu_and_mul_static_fp8_quant"]),
    (("+bogus",), ["'+bogus'", "not a lowerable layerpass op", "fused_add_rms_norm"]),
    (("-unified_attention_with_output",), ["always keeps its custom kernel", "lowerable ops: fused_add_rms_norm"]),
    (("+moe_forward",), ["layerpass.moe_forward always keeps"]),
    (("all", "none"), ["both 'all' and 'none'"]),
    (("+rms_norm", "-rms_norm"), ["'rms_norm' both with '+' and '-'"]),
    (("+",), ["'+' must be"]),
    (("rms_norm",), ["'rms_norm' must be"]),  # no sign
])
def test_custom_ops_rejects_bad_entries(spec, words) -> None:
    with pytest.raises(ValueError) as e:
        CompilationConfig(custom_ops=spec)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert "CompilationConfig.custom_ops" in str(e.value)


@pytest.mark.parametrize("value", ["none", b"all", None, 3, ("none", 3)])
def test_custom_ops_type_errors(value) -> None:
    with pytest.raises(TypeError, match="custom_ops"):
        CompilationConfig(custom_ops=value)


def test_the_op_table_says_which_ops_lower_and_split() -> None:
    import layerpass.layers.distributed  # noqa: F401  (registers the TP collectives)

    kept = always_custom_ops()
    for name in ("unified_attention_with_output", "linear_attention", "moe_forward", "moe_forward_shared",
                 "moe_forward_fp8", "moe_forward_quant_input", "tp_all_reduce", "tp_all_gather"):
        assert name in kept and name not in LOWERABLE_OPS, name
    assert set(LOWERABLE_OPS) == set(CALLS) and not set(kept) & set(LOWERABLE_OPS)
    assert all(OPS[n].native is not None and OPS[n].check is not None for n in LOWERABLE_OPS)
    assert split_point_ops() == ("layerpass.unified_attention_with_output", "layerpass.linear_attention")
    assert CompilationConfig().splitting_ops == split_point_ops()
    with pytest.raises(ValueError, match="not lowerable"):
        LoweringPass(["unified_attention_with_output"])


def test_configure_places_lowering_after_the_fusions() -> None:
    names = [p.name for p in configure(CompilationConfig())]
    assert names.index("lowering") == names.index("dead_code_elimination") - 1
    assert names.index("lowering") > max(names.index(n) for n in names if n.startswith("fuse_"))
    (lowering,) = [p for p in configure(CompilationConfig(custom_ops=("+rms_norm",))) if p.name == "lowering"]
    assert "rms_norm" not in lowering.ops and "fused_add_rms_norm" in lowering.ops
    assert "lowering" not in [p.name for p in configure(CompilationConfig(custom_ops=("all",)))]


def test_uuid_covers_the_choice_and_the_native_code() -> None:
    default = LoweringPass()
    assert default.uuid() == LoweringPass(reversed(LOWERABLE_OPS)).uuid()  # the set, not its spelling
    assert default.uuid() != LoweringPass([n for n in LOWERABLE_OPS if n != "rms_norm"]).uuid()
    hashed = default.hashed_modules()
    for module in ("layerpass.passes.lowering", "layerpass.passes.base", "layerpass.ops.norm", "layerpass.ops.quant"):
        assert module in hashed, module
    uuids = {spec: pass_manager_for(CompilationConfig(custom_ops=spec)).uuid()
             for spec in [("none",), ("+rms_norm",), ("all", "-rms_norm"), ("all",)]}
    assert len(set(uuids.values())) == len(uuids)


# ----------------------------------------------------------------------------- one op, captured graphs


def _quant_out(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    lp.static_scaled_fp8_quant(q, x, scale)
    return q


EPS = 1e-6
# op name -> (forward over the inputs, inputs builder(tokens, hidden, dtype, scale, g))
CALLS = {
    "rms_norm": lambda x, r, w, s, a, b, sb: lp.rms_norm(x, w, EPS),
    "fused_add_rms_norm": lambda x, r, w, s, a, b, sb: lp.fused_add_rms_norm(x, r, w, EPS),
    "silu_and_mul": lambda x, r, w, s, a, b, sb: lp.silu_and_mul(x),
    "static_scaled_fp8_quant": lambda x, r, w, s, a, b, sb: _quant_out(x, s),
    "static_scaled_fp8_quant_functional": lambda x, r, w, s, a, b, sb: lp.static_scaled_fp8_quant_functional(x, s),
    "scaled_fp8_mm": lambda x, r, w, s, a, b, sb: lp.scaled_fp8_mm(a, b, s, sb, x.dtype, w),
    "rms_norm_static_fp8_quant": lambda x, r, w, s, a, b, sb: lp.rms_norm_static_fp8_quant(x, w, s, EPS),
    "fused_add_rms_norm_static_fp8_quant":
        lambda x, r, w, s, a, b, sb: lp.fused_add_rms_norm_static_fp8_quant(x, r, w, s, EPS),
    "silu_and_mul_static_fp8_quant": lambda x, r, w, s, a, b, sb: lp.silu_and_mul_static_fp8_quant(x, s),
}
assert set(CALLS) == set(LOWERABLE_OPS), "a lowerable op without a test case"


class OneOp(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, *args: torch.Tensor):
        return CALLS[self.name](*args)


def op_inputs(tokens: int, hidden: int, dtype: torch.dtype, scale: float, seed: int) -> list[torch.Tensor]:
    """x [T, H] (times 3: small scales saturate some), residual [T, H], weight [H], scale, fp8 a [T, H],
    fp8 b [H, H], scale_b. ``scaled_fp8_mm`` takes the weight as its bias (hence N == H)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, hidden, generator=g) * 3).to(dtype)
    r = torch.randn(tokens, hidden, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    a = (torch.randn(tokens, hidden, generator=g) * 50).clamp(-448, 448).to(FP8_DTYPE)
    b = (torch.randn(hidden, hidden, generator=g) * 50).clamp(-448, 448).to(FP8_DTYPE)
    return [x, r, w, torch.tensor([scale]), a, b, torch.tensor([0.01])]


def assert_same(out, ref, what: str) -> None:
    """fp8: within one e4m3 step (a float32 value on a rounding boundary); floats: allclose at the
    tests' compiled-vs-eager tolerance, scaled to the dtype's resolution for bf16."""
    outs, refs = (out, ref) if isinstance(ref, (tuple, list)) else ((out,), (ref,))
    assert len(outs) == len(refs), what
    for o, r in zip(outs, refs):
        assert o.shape == r.shape and o.dtype == r.dtype, (what, o.shape, o.dtype, r.shape, r.dtype)
        if r.dtype == FP8_DTYPE:
            assert_fp8_close(o, r, max_ulps=1)
        else:
            tol = bh.ATOL if r.dtype == torch.float32 else 1e-2
            torch.testing.assert_close(o, r, atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def lower_captured(gm: fx.GraphModule, ops=LOWERABLE_OPS) -> tuple[fx.GraphModule, dict[str, int]]:
    return fh.apply_passes(gm, [LoweringPass(ops), DeadCodeEliminationPass(), FixFunctionalizationPass()])


def layerpass_nodes(graph: fx.Graph) -> list[torch._ops.OpOverload]:
    """The layerpass op each call node runs (plain or auto_functionalized), one entry per node."""
    ops = [k.op if isinstance(k, fh.functionalized) else k
           for k in (fh.op_key(n) for n in graph.nodes if n.op == "call_function")]
    return [op for op in ops if isinstance(op, torch._ops.OpOverload) and op.namespace == "layerpass"]


@pytest.mark.parametrize("name", LOWERABLE_OPS)
@settings(SETTINGS, max_examples=4)
@given(st.integers(1, 9), st.sampled_from([8, 24, 64, 96]),
       st.sampled_from([torch.float32, torch.bfloat16]), st.sampled_from([0.003, 0.02, 0.25, 2.0]),
       st.integers(0, 2**20))
def test_each_op_lowers_to_its_native_code(name, tokens, hidden, dtype, scale, seed) -> None:
    m = OneOp(name)
    inputs = op_inputs(tokens, hidden, dtype, scale, seed)
    with torch.no_grad():
        eager = m(*inputs)
    cap = fh.capture_graph(m, inputs)
    before = layerpass_nodes(cap.gm.graph)
    assert len(before) == 1, f"the captured graph should hold one {name} node, got {before}"
    lowered, matches = lower_captured(cap.gm)
    assert matches["lowering"] == 1
    assert layerpass_nodes(lowered.graph) == [] and not fh.has_auto_functionalized(lowered.graph)
    with torch.no_grad():
        assert_same(cap.run(lowered), eager, f"lowered {name}")
    kept, matches = lower_captured(cap.gm, [n for n in LOWERABLE_OPS if n != name])  # "+name": kept
    assert matches["lowering"] == 0 and len(layerpass_nodes(kept.graph)) == 1


def test_fusion_first_then_lowering_of_the_fused_op() -> None:
    """After norm+quant fused, the fused op is lowered; the unfused norm it left dead is not counted
    (dead-code clean-up removes it)."""
    from layerpass.patterns.norm_quant import NormQuantFusionPass
    from tests.patterns.test_patterns import NormQuant

    from layerpass.ops import LayerRegistry, layer_registry_scope

    with layer_registry_scope(LayerRegistry("lowering-norm-quant")):
        m = NormQuant(64, 1e-6, 0.02, torch.float32, residual=True)
    x, r = torch.randn(5, 64) * 3, torch.randn(5, 64)
    with torch.no_grad():
        eager = m(x, r)
    cap = fh.capture_graph(m, [x, r])
    out, matches = fh.apply_passes(cap.gm, [NormQuantFusionPass(), LoweringPass(), DeadCodeEliminationPass(),
                                            FixFunctionalizationPass()])
    assert matches["fuse_norm_quant"] == 1 and matches["lowering"] == 1
    assert layerpass_nodes(out.graph) == []
    with torch.no_grad():
        got = cap.run(out)
    assert torch.equal(fh.fp8_bits(got[0]), fh.fp8_bits(eager[0])) and torch.equal(got[1], eager[1])


# ----------------------------------------------------------------------------- all ops, compiled


class AllOps(nn.Module):
    """Every lowerable op once; none feeds another, so no fusion pattern applies."""

    def forward(self, *args: torch.Tensor):
        return tuple(CALLS[n](*args) for n in LOWERABLE_OPS)


def _compile_all_ops(**config):
    from layerpass.backend.pieces.compiler import LayerpassBackend

    torch.compiler.reset()
    backend = LayerpassBackend(CompilationConfig(cache_dir=bh.fresh_cache_dir("lowering"), disable_cache=True,
                                                 **config), publish_reports=False)
    compiled = torch.compile(AllOps(), backend=backend, fullgraph=True)
    return compiled, backend


def _run_token_counts(compiled, counts, dtype=torch.float32, shared_tokens=True):
    m = AllOps()
    for i, tokens in enumerate(counts):
        inputs = op_inputs(tokens, 64, dtype, 0.02, seed=tokens)
        for t in inputs:
            if t.dim() == 2 and t.shape[0] == tokens:  # the token dims, as layerpass marks them (shape_id: one symbol)
                torch._dynamo.decorators.mark_unbacked(t, 0, shape_id="tokens" if shared_tokens else None)
        with torch.no_grad():
            got, ref = compiled(*inputs), m(*inputs)
        for name, o, r in zip(LOWERABLE_OPS, got, ref):
            assert_same(o, r, f"compiled {name} at {tokens} tokens")


def test_all_ops_compiled_with_symbolic_tokens_match_eager() -> None:
    compiled, backend = _compile_all_ops()
    _run_token_counts(compiled, [5, 9, 2])
    r = backend.last_report
    assert backend.num_calls == 1, "a new token count recompiled: the token dim is not symbolic"
    assert r.pass_failures == [] and r.matches["lowering"] == len(LOWERABLE_OPS)
    torch.compiler.reset()


def test_residual_of_an_unrelated_token_count_keeps_its_op() -> None:
    """x and residual marked with separate unbacked sizes: equality is not provable, so the residual
    ops keep their kernels (a guard added now would not protect the compiled code); the rest lower."""
    compiled, backend = _compile_all_ops()
    _run_token_counts(compiled, [5, 7], shared_tokens=False)
    residual_ops = {"fused_add_rms_norm", "fused_add_rms_norm_static_fp8_quant"}
    assert backend.last_report.matches["lowering"] == len(LOWERABLE_OPS) - len(residual_ops)
    torch.compiler.reset()


def test_all_custom_compiles_without_the_pass() -> None:
    compiled, backend = _compile_all_ops(custom_ops=("all",))
    _run_token_counts(compiled, [4])
    assert "lowering" not in backend.last_report.matches
    torch.compiler.reset()


# ----------------------------------------------------------------------------- zoo models


class Probe(fh.RecordingPass):
    """Copies each piece's graph where it is added (around the lowering pass); changes nothing."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name  # type: ignore[misc]

    def uuid(self) -> str:
        return f"lowering-test-probe-{self.name}"  # it never changes a graph


def live_lowerable(graph: fx.Graph) -> list[fx.Node]:
    """Lowerable op nodes (plain or auto_functionalized) whose result something reads."""
    found = []
    for n in graph.nodes:
        key = fh.op_key(n)
        target = key.op if isinstance(key, fh.functionalized) else key
        if target not in LOWERABLE_TARGETS:
            continue
        readers = [u for u in n.users if u.target is not operator.getitem] + \
                  [v for u in n.users if u.target is operator.getitem for v in u.users]
        if readers:
            found.append(n)
    return found


def compile_probed(name: str, layers: int, **config) -> tuple[bh.Compiled, Probe, Probe]:
    before, after = Probe("before_lowering"), Probe("after_lowering")

    def setup(compiled) -> None:
        pm = compiled.backend.pass_manager
        pm.add_pass(before, before="lowering")
        pm.add_pass(after, after="lowering")

    c = bh.compile_zoo(name, layers, disable_cache=True, setup=setup, **config)
    return c, before, after


EXPECTED_FUSIONS = {  # per layer
    "llama": {},
    "llama-fp8": {"fuse_attn_quant": 1, "fuse_norm_quant": 2, "fuse_act_quant": 1},
    "moe": {"fuse_moe": 1},
}


@pytest.mark.parametrize("name", [pytest.param("llama", marks=pytest.mark.slow), "llama-fp8",
                                  pytest.param("moe", marks=pytest.mark.slow)])
def test_zoo_pieces_before_and_after_lowering(name: str) -> None:
    c, before, after = compile_probed(name, 2)
    r = c.report
    # the zoo's layers are one region (the first layer's residual is a zero): one piece, used twice
    assert r.pass_failures == [] and len(before.graphs) == len(after.graphs) == r.num_compiled == 1
    lowered = 0
    for g_before, g_after in zip(before.graphs, after.graphs):
        live_before, live_after = live_lowerable(g_before), live_lowerable(g_after)
        assert live_before, "nothing to lower in a piece: the test proves nothing"
        lowered += len(live_before) - len(live_after)
        # every lowerable op is lowered, the residual norms of later layers included: a region's
        # inputs share ONE token symbol (token_dims.TOKEN_SHAPE_ID), so input and residual match
        assert not live_after, [n.format_node() for n in live_after]
        always = [op for op in layerpass_nodes(g_after) if op not in LOWERABLE_TARGETS]
        assert always and all(op_name(op).split(".")[1] in always_custom_ops() for op in always), always
    assert lowered == r.matches_compiled["lowering"] > 0 and r.matches["lowering"] == 2 * lowered
    for fusion, per_layer in EXPECTED_FUSIONS[name].items():
        assert r.matches[fusion] == 2 * per_layer, (fusion, r.matches)
    if name == "llama-fp8":
        torch.testing.assert_close(c.out, c.ref, **fh.fp8_model_tolerance(c.ref))
    else:
        bh.assert_matches(c.out, c.ref, f"lowered {name}")


# ------------------------------------------------------------------- fusions fire as before, 2 and 32 layers

_FUSION_COUNTS_BODY = """\
from tests.passes import test_lowering as t
emit(t.fusion_counts({layers!r}))
"""


def fusion_counts(layers: list[int]) -> dict:
    """Per model and depth: the fusion matches with lowering (default) and without (all custom)."""
    import layerpass

    out = {"use_layername": layerpass.USE_LAYERNAME}
    for name in ("llama-fp8", "moe"):
        for n in layers:
            for label, spec in (("lowered", ("none",)), ("custom", ("all",))):
                c = bh.compile_zoo(name, n, disable_cache=True, custom_ops=spec)
                assert c.report.pass_failures == []
                out[f"{name}/{n}/{label}"] = {k: v for k, v in c.report.matches.items() if k.startswith("fuse")}
                out[f"{name}/{n}/{label}/lowering"] = c.report.matches.get("lowering", 0)
                out[f"{name}/{n}/{label}/max_err"] = float((c.out - c.ref).abs().max())
    return out


def _check_fusion_counts(res: dict, layers: list[int]) -> None:
    for name in ("llama-fp8", "moe"):
        for n in layers:
            lowered, custom = res[f"{name}/{n}/lowered"], res[f"{name}/{n}/custom"]
            assert lowered == custom, (name, n, lowered, custom)
            for fusion, per_layer in EXPECTED_FUSIONS[name].items():
                assert lowered[fusion] == n * per_layer, (name, n, fusion, lowered)
            assert res[f"{name}/{n}/lowered/lowering"] > 0 and res[f"{name}/{n}/custom/lowering"] == 0


@pytest.mark.slow
def test_fusions_fire_as_without_lowering_switch_on() -> None:
    import layerpass

    if not layerpass.USE_LAYERNAME:
        pytest.skip("this process runs with VLLM_USE_LAYERNAME=0; the subprocess test covers it")
    _check_fusion_counts(fusion_counts([2, 32]), [2, 32])


@pytest.mark.slow
def test_fusions_fire_as_without_lowering_switch_off() -> None:
    """``VLLM_USE_LAYERNAME=0`` is read at import: a fresh process. Every layer is its own region there
    (one compile per layer), so 2 and 4 layers."""
    env = dict(bh.subprocess_env(), VLLM_USE_LAYERNAME="0")
    res = bh.run_python(_FUSION_COUNTS_BODY.format(layers=[2, 4]), env=env, timeout=1200,
                        what="VLLM_USE_LAYERNAME=0 process").result
    assert res["use_layername"] is False
    _check_fusion_counts(res, [2, 4])
