"""``Step.run``: runs only the step's own model (the registry, KV cache and state come from the step)."""

from __future__ import annotations

import pytest
import torch

import layerpass
from layerpass.backend.config import CompilationConfig
from layerpass.models import build_model, make_step
from tests.helpers import backend as bh


@pytest.fixture(scope="module")
def models():
    a, b = build_model("llama", num_layers=1), build_model("llama", num_layers=1, seed=1)
    return a, b, make_step(a, num_decodes=1, prefill_lens=[3])


def test_run_refuses_another_model(models) -> None:
    """Before: stepA.run(modelB) ran B's weights against A's KV cache and experts."""
    a, b, step = models
    with pytest.raises(ValueError, match=r"not the model this step was made for.*make_step\(model"):
        step.run(b)


def test_run_refuses_another_model_wrapped(models) -> None:
    a, b, step = models
    for wrapped in (torch.compile(b, backend="eager"), layerpass.compile(b, CompilationConfig(disable_cache=True)),
                    b.forward):
        with pytest.raises(ValueError, match=r"not the model this step was made for"):
            step.run(wrapped)


def test_run_refuses_a_module_with_another_registry(models) -> None:
    a, b, step = models
    other = torch.nn.Identity()
    other.layer_registry = b.layer_registry
    with pytest.raises(ValueError, match=r"not the model this step was made for"):
        step.run(other)


def test_run_accepts_the_model_and_its_wrappers(models) -> None:
    a, b, step = models
    ref = step.run(a)
    assert torch.equal(step.run(), ref)
    assert torch.equal(step.run(a.forward), ref)
    torch.testing.assert_close(step.run(torch.compile(a, backend="eager")), ref)
    torch.testing.assert_close(step.run(lambda ids, pos: a(ids, pos)), ref)  # a plain function: not checked


@pytest.mark.slow  # a real compile
def test_run_accepts_layerpass_compile_of_the_model(models) -> None:
    a, _, step = models
    compiled = layerpass.compile(a, CompilationConfig(cache_dir=bh.fresh_cache_dir("step")))
    bh.assert_matches(step.run(compiled), step.run(a))


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(prefill_lens=[2.5]), r"prefill_lens\[0\] must be an int >= 1, got 2.5 \(float\)"),
    (dict(prefill_lens=["53"]), r"prefill_lens\[0\] must be an int >= 1, got '53' \(str\)"),
    (dict(prefill_lens=[3, True]), r"prefill_lens\[1\] must be an int >= 1, got True \(bool\)"),
    (dict(prefill_lens=4), r"prefill_lens must be a sequence of ints, got int"),
    (dict(num_decodes=1.0, prefill_lens=[2]), r"num_decodes must be an int >= 0, got 1.0 \(float\)"),
    (dict(num_decodes=1, prefill_lens=[2], history_lens=[2.0]), r"history_lens\[0\] must be an int >= 1"),
    (dict(prefill_lens=[2], seed="0"), r"seed must be an int"),
])
def test_a_bad_argument_is_named_and_nothing_leaks(kwargs, fragment) -> None:
    """Before: ``prefill_lens=[2.5]`` or ``["53"]`` raised a raw TypeError and leaked 2 KV slots."""
    model = build_model("llama", num_layers=1)
    free = model.block_allocator.num_free, model.state_allocator.num_free
    kwargs = {"num_decodes": 0, **kwargs}
    with pytest.raises(ValueError, match=rf"make_step: {fragment}"):
        make_step(model, **kwargs)
    assert (model.block_allocator.num_free, model.state_allocator.num_free) == free


def test_a_failure_after_allocating_frees_it(monkeypatch) -> None:
    """Anything that fails once blocks and slots are taken (here the history prefill) gives them back."""
    model = build_model("llama", num_layers=1)
    free = model.block_allocator.num_free, model.state_allocator.num_free

    def broken(*args, **kwargs):
        raise RuntimeError("planted")

    monkeypatch.setattr(model, "forward", broken)
    with pytest.raises(RuntimeError, match="planted"):
        make_step(model, num_decodes=2, prefill_lens=[3])
    assert (model.block_allocator.num_free, model.state_allocator.num_free) == free
