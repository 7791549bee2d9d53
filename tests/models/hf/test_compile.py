"""Converted HF models under ``torch.compile(model, backend="layerpass")`` (the whole-model path):
every family gives eager's logits and HF's greedy tokens through the continuous-batching loop,
and the number of distinct compiled pieces does not grow with depth (2 vs 4 layers). Layers that
differ only in attention features (Gemma's alternating sliding / global layers) share their
piece; layers whose graphs really differ (Qwen2-MoE's dense and sparse MLPs) do not.

Every case compiles (about 10-25 s each on the shared 2-core box): all slow. The Inductor cache
is the test session's (``tests.helpers.backend``), the layerpass cache a fresh directory per case.
"""

from __future__ import annotations

import contextlib
import functools
import os

import pytest
import torch

pytest.importorskip("transformers")

import layerpass  # noqa: E402
from layerpass.backend.report.compile_report import num_compile_reports  # noqa: E402
from layerpass.models import make_step  # noqa: E402
from tests.helpers import backend as bh  # noqa: E402  (session Inductor cache, recompile limits)
from tests.models.hf.common import (  # noqa: E402
    FAMILIES,
    GEN_ADMIT_AT,
    GEN_NEW_TOKENS,
    GEN_PROMPT_LENS,
    LoopStats,
    generate_cb,
    hf_generate,
    pair,
    prompts,
)

STEP = dict(num_decodes=2, prefill_lens=[3, 5])


def unbacked_tokens(compiled):
    """Call ``compiled`` with the token dim marked unbacked (as ``layerpass.compile`` does): one
    graph serves every batch size, one-token steps included."""

    def run(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        for t in (input_ids, positions):
            torch._dynamo.decorators.mark_unbacked(t, 0)
        return compiled(input_ids, positions)

    return run


@contextlib.contextmanager
def fresh_layerpass_cache(tag: str):
    """The default backend's on-disk cache in a fresh directory (never ``~/.cache/layerpass``)."""
    old = os.environ.get("LAYERPASS_CACHE_DIR")
    os.environ["LAYERPASS_CACHE_DIR"] = bh.fresh_cache_dir(tag)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LAYERPASS_CACHE_DIR", None)
        else:
            os.environ["LAYERPASS_CACHE_DIR"] = old


def compile_and_run(model, tag: str):
    """(compiled runner, report of its compile, eager logits, compiled logits) on the standard step."""
    run = unbacked_tokens(torch.compile(model, backend="layerpass"))
    step = make_step(model, **STEP)
    try:
        with fresh_layerpass_cache(tag):
            ref, out = step.run(), step.run(run)
    finally:
        step.release()
    return run, layerpass.last_compile_report(), ref, out


@functools.cache
def compiled_case(name: str, num_layers: int):
    """(HF model, converted model, compiled runner, report of the first compile, eager and compiled logits)."""
    hf, model = pair(name, num_layers)
    return (hf, model, *compile_and_run(model, f"{name}{num_layers}"))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_compiled_family_matches_and_pieces_do_not_grow(name: str) -> None:
    small = compiled_case(name, 2)
    hf, model, run, report, ref, out = compiled_case(name, 4)
    for layers, (_, _, _, rep, r, o) in ((2, small), (4, (hf, model, run, report, ref, out))):
        bh.assert_matches(o, r, f"{name} with {layers} layers compiled")
        assert not rep.pass_failures, rep.pass_failures
    # prologue, one piece per decoder layer, epilogue; the distinct ones do not grow with depth
    assert [p.layer for p in report.pieces] == [None, 0, 1, 2, 3, None]
    assert report.num_unique_pieces == small[3].num_unique_pieces <= 4
    if name == "hf-qwen2-moe":  # the shared-expert MoE fusion fires on every layer
        assert sum(v for k, v in report.matches.items() if "moe" in k) == 4, report.matches
    # greedy continuous batching through the compiled model: HF's tokens, and no new compile
    ps = prompts(model.config.vocab_size, GEN_PROMPT_LENS, seed=5)
    before = num_compile_reports()
    stats = LoopStats()
    got = generate_cb(model, ps, GEN_ADMIT_AT, GEN_NEW_TOKENS, fn=run, stats=stats)
    assert num_compile_reports() == before, "a batch of another shape recompiled the model"
    assert stats.mixed_steps >= 2
    assert got == [hf_generate(hf, p, GEN_NEW_TOKENS) for p in ps], f"{name}: compiled greedy tokens differ from HF"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hf-gemma2", "hf-gemma3"])
def test_alternating_sliding_and_global_layers_share_one_piece(name: str) -> None:
    """Sliding (window 8) and global layers alternate; the window is a layer attribute the op
    reads by name, so both kinds trace to one graph: prologue, one layer piece, epilogue."""
    _, model, _, report, ref, out = compiled_case(name, 4)
    assert [a.sliding_window for a in (layer.self_attn.attn for layer in model.model.layers)] == [8, None, 8, None]
    bh.assert_matches(out, ref, f"{name} compiled")
    layer_keys = {p.key for p in report.pieces if p.layer is not None}
    assert len(layer_keys) == 1 and report.num_unique_pieces == 3, [(p.layer, p.key, p.source) for p in report.pieces]


@pytest.mark.slow
def test_layers_whose_graphs_differ_do_not_share() -> None:
    """Qwen2-MoE with ``decoder_sparse_step=2``: dense MLP layers and sparse MoE layers alternate,
    so there are two layer pieces (each shared by its kind), and the result is still eager's."""
    from layerpass.models import ModelConfig
    from layerpass.models.hf import HF_ZOO, build_hf_model, from_transformers

    cfg = HF_ZOO["hf-qwen2-moe"](ModelConfig(num_layers=4))
    cfg.decoder_sparse_step = 2  # layers 1 and 3 sparse
    model = from_transformers(build_hf_model(cfg, seed=1))
    assert [type(layer.mlp).__name__ for layer in model.model.layers] == ["TransformersMLP", "TransformersSparseMoeBlock"] * 2
    _, report, ref, out = compile_and_run(model, "qwen2moe-mixed")
    bh.assert_matches(out, ref, "qwen2-moe dense/sparse compiled")
    keys = [p.key for p in report.pieces if p.layer is not None]
    assert keys[0] == keys[2] and keys[1] == keys[3] and keys[0] != keys[1], keys


def test_bench_accepts_the_hf_zoo_names() -> None:
    from layerpass.bench.config import check_models

    check_models(sorted(FAMILIES))


@pytest.mark.slow
def test_bench_runs_converted_hf_models(tmp_path) -> None:
    """``layerpass bench --models hf-qwen2,hf-gemma2``: cold + warm measurements (about 2 minutes)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "layerpass", "bench", "--models", "hf-qwen2,hf-gemma2", "--layers", "2",
                           "--modes", "layerpass", "--out", str(out), "--jobs", "1", "--repeats", "3", "--no-plots",
                           "--strict"], capture_output=True, text=True, timeout=600,
                          env=bh.subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (out / "results.json").read_text()
    assert "hf-qwen2" in text and "hf-gemma2" in text, text[:2000]
    json.loads(text)
