"""Where the ops' argument checks run: every eager call, once per compiled piece, never per compiled call.

The layer-facing entry points (``ops.norm.rms_norm``, ``ops.attention.unified_attention_with_output``,
...) check and then call ``torch.ops.layerpass.<op>``; under ``torch.compile`` Dynamo traces through
them to the same single op node without the check, and the op's fake kernel runs the checks on
fake tensors instead (trace time). The real kernels (CPU, Triton) never check. So a compiled step
pays for no argument check; a bad argument still fails at trace time (compiled) or at the call (eager).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import torch

import layerpass
from layerpass.backend.config import CompilationConfig
from layerpass.models import build_model, make_step
from layerpass.ops import attention, fused, linear_attention, moe, moe_quant, norm, quant
from tests.helpers import backend as bh

# Every argument-check function of the ops (each call site looks it up in its module, so patching
# the module attribute sees every call: entry points, fake kernels, nested checks).
CHECKS = [
    (norm, "check_norm_args"), (norm, "check_silu_and_mul_arg"),
    (quant, "check_quant_out"), (quant, "check_quant_functional_args"), (quant, "check_scaled_mm_args"),
    (quant, "_check_scale"), (quant, "check_scale_value"),
    (fused, "check_norm_quant_args"), (fused, "check_act_quant_args"),
    (attention, "check_attention_args"),
    (moe, "check_moe_args"),
    (moe_quant, "check_moe_fp8_args"), (moe_quant, "check_moe_forward_fp8_args"), (moe_quant, "check_moe_quant_input_args"),
    (linear_attention, "check_linear_attention_args"),
]


@pytest.fixture
def counted(monkeypatch) -> Iterator[Counter]:
    """Counts the calls of every check function (by name) while the test runs."""
    calls: Counter = Counter()
    for mod, name in CHECKS:
        original = getattr(mod, name)

        def counting(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(mod, name, counting)
    yield calls


def _steps(fn, step, n: int, calls: Counter) -> list[Counter]:
    """The checks each of ``n`` runs of ``step`` made."""
    per_step = []
    with torch.no_grad():
        for _ in range(n):
            calls.clear()
            step.run(fn)
            per_step.append(Counter(calls))
    return per_step


# llama-fp8: norms, activation, FP8 quant and matmul, attention (and, compiled by layerpass, the
# fused ops the passes put in); bailing-hybrid: linear attention, softmax attention, MoE with shared experts
MODELS = ["llama-fp8", "bailing-hybrid"]


@pytest.mark.parametrize("name", MODELS)
def test_eager_checks_every_call(name: str, counted: Counter) -> None:
    model = build_model(name, num_layers=2)
    step = make_step(model, num_decodes=2, prefill_lens=[3, 5])
    per_step = _steps(model, step, 3, counted)
    assert per_step[0] and all(c == per_step[0] for c in per_step), per_step
    expected = {"check_norm_args", "check_attention_args"} | (
        {"check_quant_out", "check_scaled_mm_args"} if name == "llama-fp8" else {"check_linear_attention_args", "check_moe_args"})
    assert expected <= set(per_step[0]), per_step[0]


def _compiled_steps(name: str, compile_fn, calls: Counter) -> list[Counter]:
    model = build_model(name, num_layers=2)
    step = make_step(model, num_decodes=2, prefill_lens=[3, 5])
    with torch.no_grad():
        ref = step.run(model)
    torch.compiler.reset()  # a fresh trace (Dynamo would reuse another test's code for this model class)
    compiled = compile_fn(model)
    per_step = _steps(compiled, step, 4, calls)
    with torch.no_grad():
        bh.assert_matches(step.run(compiled), ref)
    return per_step


@pytest.mark.parametrize("name", MODELS)
def test_compiled_checks_at_trace_time_only(name: str, counted: Counter) -> None:
    """The first compiled step traces (the fake kernels check); later steps run no check at all."""
    per_step = _compiled_steps(name, lambda m: torch.compile(m, backend="aot_eager", dynamic=True), counted)
    assert per_step[0], "the trace ran no check: the fake kernels do not check"
    assert "check_attention_args" in per_step[0] and "check_norm_args" in per_step[0], per_step[0]
    assert per_step[1:] == [Counter()] * 3, per_step


@pytest.mark.slow  # a real compile (regions, passes, Inductor)
@pytest.mark.parametrize("name", MODELS)
def test_layerpass_compiled_checks_at_trace_time_only(name: str, counted: Counter) -> None:
    """``layerpass.compile`` runs the model's own forward eagerly and each decoder layer in its
    compiled region: after the first step (the trace) the layers check nothing; what is left is the
    one eager call around them, the final norm's entry point (as in any eager call)."""
    per_step = _compiled_steps(
        name, lambda m: layerpass.compile(m, CompilationConfig(cache_dir=bh.fresh_cache_dir(f"checks-{name}"))), counted)
    assert per_step[0]["check_attention_args"] > 0, "the trace ran no check: the fake kernels do not check"
    assert per_step[1:] == [Counter({"check_norm_args": 1})] * 3, per_step


def test_kernels_do_not_check(monkeypatch) -> None:
    """The raw ops in eager (what compiled code calls) run no check function."""
    for mod, name in CHECKS:
        monkeypatch.setattr(mod, name, lambda *a, _n=name, **k: pytest.fail(f"a kernel ran {_n}"))
    x, w, s = torch.randn(3, 8), torch.ones(8), torch.tensor([0.05])
    lp = torch.ops.layerpass
    lp.rms_norm(x, w, 1e-6)
    lp.fused_add_rms_norm(x, x, w, 1e-6)
    lp.silu_and_mul(x)
    q = lp.static_scaled_fp8_quant_functional(x, s)
    lp.static_scaled_fp8_quant(torch.empty_like(q), x, s)
    lp.scaled_fp8_mm(q, q, s, s, torch.float32)
    lp.rms_norm_static_fp8_quant(x, w, s, 1e-6)
    lp.fused_add_rms_norm_static_fp8_quant(x, x, w, s, 1e-6)
    lp.silu_and_mul_static_fp8_quant(x, s)


BAD_CALLS = [  # (op, args, message): each raw op's fake kernel rejects them at trace time
    ("rms_norm", lambda: (torch.randn(2, 4), torch.ones(5), 1e-6), "weight must have shape"),
    ("fused_add_rms_norm", lambda: (torch.randn(2, 4), torch.randn(3, 4), torch.ones(4), 1e-6), "residual must match"),
    ("silu_and_mul", lambda: (torch.randn(2, 5),), "even last dimension"),
    ("static_scaled_fp8_quant_functional", lambda: (torch.randn(3), torch.ones(2)), "one-element scale"),
    ("static_scaled_fp8_quant", lambda: (torch.empty(3), torch.randn(3), torch.ones(1)), "result must be"),
    ("scaled_fp8_mm", lambda: (torch.randn(2, 3), torch.randn(4, 3).to(quant.FP8_DTYPE), torch.ones(1), torch.ones(1),
                               torch.float32), "float8_e4m3fn operands"),
    ("rms_norm_static_fp8_quant", lambda: (torch.randn(2, 4), torch.ones(3), torch.ones(1), 1e-6), "weight must have shape"),
    ("silu_and_mul_static_fp8_quant", lambda: (torch.randn(2, 4), torch.ones(2)), "one-element scale"),
    ("unified_attention_with_output", lambda: (torch.randn(3, 4, 8), torch.randn(3, 3, 8), torch.randn(3, 3, 8),
                                               torch.empty(3, 4, 8), "no.such.layer"), "not a multiple"),
    ("moe_forward", lambda: (torch.randn(3, 8), torch.randn(2, 4), "no.such.layer"), r"router_logits \[T, E\]"),
    ("linear_attention", lambda: (torch.randn(3, 2, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 4), torch.empty(3, 2, 5),
                                  "no.such.layer"), "must have the value's shape"),
]


@pytest.mark.parametrize("op,make,message", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_fake_kernels_check(op: str, make, message: str) -> None:
    """At trace time (fake tensors) a bad argument is the same clear ``ValueError`` as in eager."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), pytest.raises(ValueError, match=message):
        getattr(torch.ops.layerpass, op)(*make())


def test_compile_with_a_bad_argument_fails_at_trace_time() -> None:
    """Dynamo wraps the fake kernel's ``ValueError`` (a ``TorchRuntimeError`` naming it): same message."""
    def f(x, w):
        return norm.rms_norm(x, w, 1e-6)

    with pytest.raises(Exception, match=r"ValueError.*rms_norm: weight must have shape \(4,\)"):
        torch.compile(f, backend="aot_eager", fullgraph=True)(torch.randn(2, 4), torch.ones(5))


def test_entry_points_give_the_same_graph_as_the_raw_ops() -> None:
    """What the fusion passes match: one op node per call, no check code in the graph."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    def checked(x, r, w, s):
        y, r2 = norm.fused_add_rms_norm(x, r, w, 1e-6)
        return quant.static_scaled_fp8_quant_functional(norm.silu_and_mul(norm.rms_norm(y, w, 1e-6)), s), r2

    def raw(x, r, w, s):
        lp = torch.ops.layerpass
        y, r2 = lp.fused_add_rms_norm(x, r, w, 1e-6)
        return lp.static_scaled_fp8_quant_functional(lp.silu_and_mul(lp.rms_norm(y, w, 1e-6)), s), r2

    args = (torch.randn(3, 8), torch.randn(3, 8), torch.ones(8), torch.tensor([0.1]))
    for fn in (checked, raw):
        torch.compile(fn, backend=capture, fullgraph=True)(*args)
    targets = [[n.target for n in g.graph.nodes if n.op == "call_function"] for g in graphs]
    assert targets[0] == targets[1] and len(targets[0]) >= 4, targets
