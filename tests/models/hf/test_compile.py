"""Transformers backend under ``layerpass.compile``: converted HF models compile with the
``"layers"`` split, match eager, share one compiled piece across decoder layers, and report the
fusions that apply without FP8 (the MoE shared-expert fusion on Qwen2-MoE).

The HF models are zoo names (``hf-llama``, ``hf-qwen2-moe``), so the backend tests' memoised
``compiled_zoo`` and per-session Inductor cache serve them: four compiles, mostly cache hits.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tests.helpers import backend as bh  # noqa: E402
from layerpass.models import make_step  # noqa: E402

FUSIONS = ("fuse_attn_quant", "fuse_norm_quant", "fuse_act_quant", "fuse_moe")


@pytest.mark.parametrize("name", ["hf-llama", "hf-qwen2-moe"])
def test_compiled_matches_eager_and_pieces_do_not_grow(name: str) -> None:
    small, large = bh.compiled_zoo(name, 2), bh.compiled_zoo(name, 4)
    for c in (small, large):
        bh.assert_matches(c.out, c.ref, f"{name} compiled")
        assert c.report.recompiles == 0 and not c.report.pass_failures
    # one piece per decoder layer (children of model.layers) plus prologue and epilogue
    assert [p.layer for p in large.report.pieces] == [None, 0, 1, 2, 3, None]
    # prologue, first layer, middle layers, epilogue at most: the count does not grow with layers
    assert small.report.num_unique_pieces == large.report.num_unique_pieces <= 4
    assert [p.source for p in large.report.pieces[3:5]] == ["shared"] * 2


def test_new_batch_shape_does_not_recompile() -> None:
    c = bh.compiled_zoo("hf-llama", 2)
    step = make_step(c.model, num_decodes=3, prefill_lens=[6], seed=5)
    try:
        with torch.no_grad():
            bh.assert_matches(step.run(c.compiled), step.run(c.model), "hf-llama second batch")
        assert c.compiled.recompiles == 0
    finally:
        step.release()


@pytest.mark.parametrize("name,expected", [("hf-llama", {}), ("hf-qwen2-moe", {"fuse_moe": 1})])
def test_fusions_that_apply_without_fp8_are_reported(name: str, expected: dict[str, int]) -> None:
    for layers in (2, 4):
        report = bh.compiled_zoo(name, layers).report
        got = {f: report.matches.get(f, 0) for f in FUSIONS}
        assert got == {f: expected.get(f, 0) * layers for f in FUSIONS}, f"{name} with {layers} layers: {got}"


def test_bench_accepts_the_hf_zoo_names() -> None:
    from layerpass.bench.sweep import check_models

    check_models(["hf-llama", "hf-qwen2-moe", "hf-mixtral", "hf-qwen3-moe"])


@pytest.mark.slow
def test_bench_runs_converted_hf_models(tmp_path) -> None:
    """``layerpass bench --models hf-llama,hf-qwen2-moe``: cold + warm measurements (about 2 minutes)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "layerpass", "bench", "--models", "hf-llama,hf-qwen2-moe", "--layers", "2",
                           "--modes", "layerpass", "--out", str(out), "--jobs", "1", "--repeats", "3", "--no-plots",
                           "--budget", "500", "--strict"], capture_output=True, text=True, timeout=600,
                          env=bh.subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (out / "results.json").read_text()
    assert "hf-llama" in text and "hf-qwen2-moe" in text, text[:2000]
    json.loads(text)
