"""A compiled model checks a step's inputs before Dynamo sees them (``backend/inputs.py``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import layerpass
from layerpass.backend.config import CompilationConfig
from layerpass.backend.inputs import check_model_inputs, check_step_inputs
from layerpass.models import build_model
from tests.helpers import backend as bh


@pytest.fixture(scope="module")
def compiled():
    model = build_model("llama", num_layers=1)
    return layerpass.compile(model, CompilationConfig(disable_cache=True))


BAD = [
    # (input_ids, positions, message)
    (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), r"input_ids must be a 1-D integer.*2-D.*flatten"),
    (torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long), r"input_ids has 3 tokens, positions 4"),
    (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), r"0-token batch"),
    (torch.zeros(3), torch.arange(3), r"input_ids must be a 1-D integer tensor.*float32"),
    (torch.zeros(3, dtype=torch.bool), torch.arange(3), r"input_ids must be .*bool"),
    (torch.arange(3), torch.arange(3).float(), r"positions must be a 1-D integer tensor"),
    (torch.arange(3), torch.tensor(2), r"positions must be a 1-D integer tensor.*0-D"),
    ([1, 2, 3], torch.arange(3), r"input_ids must be a 1-D integer tensor.*a list"),
    (torch.arange(3), torch.arange(3, device="meta"), r"one device"),
]


@pytest.mark.parametrize("ids,pos,message", BAD)
def test_compiled_model_rejects_bad_input_before_dynamo(compiled, ids, pos, message) -> None:
    """Before: a fake-tensor TorchRuntimeError, a failed guard ('This is a bug') or ``Ne(u0, 0)``."""
    with pytest.raises(ValueError, match=rf"layerpass compiled model: .*{message}"):
        compiled(ids, pos)
    with pytest.raises(ValueError, match=message):  # keyword arguments too
        compiled(input_ids=ids, positions=pos)
    assert compiled.backend.num_calls == 0, "nothing may be traced or compiled for a bad input"


@settings(max_examples=50, deadline=None)
@given(ids_shape=st.lists(st.integers(0, 4), max_size=3), pos_shape=st.lists(st.integers(0, 4), max_size=3),
       ids_dtype=st.sampled_from([torch.int64, torch.int32, torch.float32, torch.bool, torch.int16]),
       pos_dtype=st.sampled_from([torch.int64, torch.int32, torch.float16]))
def test_exactly_the_valid_steps_pass(ids_shape, pos_shape, ids_dtype, pos_dtype) -> None:
    ids, pos = torch.zeros(ids_shape, dtype=ids_dtype), torch.zeros(pos_shape, dtype=pos_dtype)
    valid = (len(ids_shape) == 1 and ids_shape == pos_shape and ids_shape[0] > 0
             and ids_dtype in (torch.int64, torch.int32) and pos_dtype in (torch.int64, torch.int32))
    if valid:
        check_step_inputs(ids, pos)
    else:
        with pytest.raises(ValueError, match=r"model forward: (input_ids|positions|a 0-token batch)"):
            check_step_inputs(ids, pos)


def test_models_with_other_inputs_are_not_checked() -> None:
    stack = bh.Stack(2)
    check_model_inputs(stack, (torch.zeros(2, 3, 8),), {})  # a [B, S, H] input: fine for this model
    check_model_inputs(stack, (), {"nonsense": 1})  # does not bind: the call itself reports it


@pytest.mark.slow  # a real compile
def test_valid_input_still_compiles_and_runs(compiled) -> None:
    from layerpass.models import make_step

    step = make_step(compiled.model, num_decodes=1, prefill_lens=[2])
    bh.assert_matches(step.run(compiled), step.run(compiled.model))


@pytest.mark.parametrize("bad", [4096, 5000, -1])
def test_positions_outside_the_rotary_cache_are_refused(bad: int) -> None:
    """Before: eager raised an IndexError from the cos/sin cache; compiled, the process aborted on an
    Inductor bounds assert."""
    from layerpass.models import make_step
    from layerpass.ops.step_inputs import max_position

    model = build_model("llama", num_layers=2)
    assert max_position(model) == model.config.max_position == 4096
    step = make_step(model, num_decodes=1, prefill_lens=[2])
    step.positions = step.positions.clone()
    step.positions[-1] = bad
    compiled = layerpass.compile(model, CompilationConfig(disable_cache=True))
    message = rf"positions must be in \[0, 4096\) \(the model's max_position\), got positions from {min(bad, 0)} to"
    with torch.no_grad():
        with pytest.raises(ValueError, match=rf"model forward: {message}"):
            step.run(model)
        with pytest.raises(ValueError, match=rf"layerpass compiled model: {message}"):
            step.run(compiled)
    assert compiled.backend.num_calls == 0, "nothing may be traced or compiled for a bad input"


def test_max_position_is_the_smallest_bound() -> None:
    from layerpass.layers import RotaryEmbedding
    from layerpass.ops import LayerRegistry, layer_registry_scope
    from layerpass.ops.step_inputs import PositionBounded, max_position

    model = build_model("llama", num_layers=2, max_position=64)
    with layer_registry_scope(LayerRegistry()):
        short, shorter = (RotaryEmbedding(model.config.head_size, max_position=n, prefix=f"r{n}") for n in (32, 16))
    model.model.layers[1].self_attn.rotary_emb = short
    assert max_position(model) == 32  # a rotary cache shorter than the config says
    model.model.layers[0].self_attn.rotary_emb = shorter
    assert max_position(model) == 32, "the module walk runs once per model"
    assert max_position(build_model("llama", num_layers=2, max_position=64)) == 64
    assert max_position(bh.Stack(2)) is None

    class Window(torch.nn.Module, PositionBounded):  # any module may declare a bound, not only the rotary one
        max_position = 8

    stack = bh.Stack(2)
    stack.window = Window()
    assert max_position(stack) == 8
    check_step_inputs(torch.arange(3), torch.tensor([0, 5, 10**6]), max_position=None)  # no bound: not checked
    check_step_inputs(torch.arange(3), torch.tensor([0, 5, 63]), max_position=64)
    # values on other devices are not read (on CUDA that would be a sync per step)
    check_step_inputs(torch.arange(3, device="meta"), torch.tensor([0, 5, 64], device="meta"), max_position=64)


def _torch_compile_refuses_bad_steps(backend: str) -> None:
    """Before: with torch.compile the checks were skipped while tracing (``is_compiling``): positions
    = -1 ran and returned logits; 4096 and a 0-token batch gave torch-internal errors."""
    from layerpass.models import make_step

    torch.compiler.reset()
    model = build_model("llama", num_layers=2)
    step = make_step(model, num_decodes=1, prefill_lens=[2])
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        want = step.run(model)
        bh.assert_matches(step.run(compiled), want)
        good = step.positions
        for bad in (-1, 4096):
            step.positions = good.clone()
            step.positions[-1] = bad
            with pytest.raises(ValueError, match=rf"model forward: positions must be in \[0, 4096\) \(the model's "
                                                 rf"max_position\), got positions from {min(bad, 0)} to"):
                step.run(compiled)
        empty = torch.zeros(0, dtype=torch.long)
        with pytest.raises(ValueError, match=r"model forward: a 0-token batch"):
            compiled(empty, empty)
        step.positions = good
        bh.assert_matches(step.run(compiled), want)  # still compiled, still right
        wider = make_step(model, num_decodes=2, prefill_lens=[3])
        bh.assert_matches(wider.run(compiled), wider.run(model))
    torch.compiler.reset()


def test_torch_compile_checks_step_inputs() -> None:
    _torch_compile_refuses_bad_steps("aot_eager")


@pytest.mark.slow  # a real compile (passes, Inductor)
def test_torch_compile_with_the_layerpass_backend_checks_step_inputs() -> None:
    _torch_compile_refuses_bad_steps("layerpass")


def test_a_static_bad_input_does_not_turn_compilation_off() -> None:
    """A bad input the trace sees is refused without raising inside Dynamo (which would make Dynamo
    run this forward eagerly from then on): the next valid step is traced and compiled again."""
    from torch._dynamo.testing import CompileCounter

    from layerpass.models import make_step

    torch.compiler.reset()
    model = build_model("llama", num_layers=1)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"input_ids must be a 1-D integer tensor.*2-D"):
            compiled(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
        frames = counter.frame_count
        step = make_step(model, num_decodes=1, prefill_lens=[2])
        bh.assert_matches(step.run(compiled), step.run(model))
    assert counter.frame_count == frames + 1, "the valid step after a bad one must be compiled"
    torch.compiler.reset()
