"""Tensor parallelism under ``layerpass.compile``: 2 gloo ranks of a converted HF model run as
regions, give the greedy tokens of one rank and of HF ``generate()``, and a second launch on
the same cache dir warm-starts.

Llama and Qwen2 at the zoo widths have 2 KV heads, so one per rank: HF's rotary output is then
a ``[1, 1, T, D]`` tensor, which once crashed Inductor on the region path
(``GuardOnDataDependentSymNode``; see ``models/hf/attention.token_rows``). Two launches of two
interpreters each, one compile per family in the first: slow.
"""

from __future__ import annotations

import os

import pytest

from tests.helpers.distributed import spawn_ranks

pytest.importorskip("transformers")

FAMILIES = ["hf-llama", "hf-qwen2"]
WORLD = 2
SEED = 3


def _compiled_tokens(name: str, cache_dir: str) -> dict:
    import layerpass
    from layerpass.backend.config import CompilationConfig
    from layerpass.models import build_model
    from tests.models.hf import common as hc

    model = build_model(name, num_layers=2, seed=SEED)
    compiled = layerpass.compile(model, CompilationConfig(cache_dir=cache_dir))
    reports = []

    def run(input_ids, positions):
        out = compiled(input_ids, positions)
        reports.append(layerpass.last_compile_report())
        return out

    ps = hc.prompts(model.config.vocab_size, hc.GEN_PROMPT_LENS, seed=2)
    tokens = hc.generate_cb(model, ps, hc.GEN_ADMIT_AT, hc.GEN_NEW_TOKENS, fn=run)
    return {"tokens": tokens, "traces": sorted({r.trace for r in reports}), "warm_start": reports[0].warm_start,
            "kv_heads": model.model.layers[0].self_attn.attn.num_kv_heads}


def _worker(rank: int) -> dict:
    from layerpass.layers import get_tp_world_size

    cache_dir = os.environ["LAYERPASS_TP_TEST_CACHE"]
    return {"world": get_tp_world_size(), **{name: _compiled_tokens(name, cache_dir) for name in FAMILIES}}


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """Two launches of 2 ranks on one shared cache dir (as ranks of one server share it)."""
    cache_dir = str(tmp_path_factory.mktemp("tp-compile-cache"))
    os.environ["LAYERPASS_TP_TEST_CACHE"] = cache_dir  # spawned ranks inherit the environment
    try:
        return [spawn_ranks(_worker, tmp_path_factory.mktemp(f"tp-compile-{i}"), WORLD) for i in range(2)]
    finally:
        del os.environ["LAYERPASS_TP_TEST_CACHE"]


@pytest.fixture(scope="module")
def one_rank():
    """Tokens of one process: the converted model in eager, and HF ``generate()`` on the same weights."""
    from layerpass.models import build_model
    from layerpass.models.hf import build_hf_model
    from tests.models.hf import common as hc

    out = {}
    for name in FAMILIES:
        model = build_model(name, num_layers=2, seed=SEED)
        hf = build_hf_model(hc.hf_config(name, 2), seed=SEED)
        ps = hc.prompts(model.config.vocab_size, hc.GEN_PROMPT_LENS, seed=2)
        out[name] = {"eager": hc.generate_cb(model, ps, hc.GEN_ADMIT_AT, hc.GEN_NEW_TOKENS),
                     "hf": [hc.hf_generate(hf, p, hc.GEN_NEW_TOKENS) for p in ps]}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_two_ranks_compiled_equal_one_rank_and_hf(launches, one_rank, name: str) -> None:
    want = one_rank[name]
    assert want["eager"] == want["hf"], f"{name}: one-rank eager differs from HF generate()"
    for launch, results in enumerate(launches):
        for rank, res in enumerate(results):
            got = res[name]
            where = f"{name} launch {launch} rank {rank}"
            assert res["world"] == WORLD and got["kv_heads"] == 1, where
            assert got["traces"] == ["regions"], f"{where}: {got['traces']}"
            assert got["tokens"] == want["hf"], f"{where}: greedy tokens differ from one rank / HF generate()"


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_second_launch_warm_starts(launches, name: str) -> None:
    # (in the first launch a rank may already load what the other saved: they share the dir)
    for rank, res in enumerate(launches[1]):
        assert res[name]["warm_start"] == "loaded", (name, rank, res[name]["warm_start"])
