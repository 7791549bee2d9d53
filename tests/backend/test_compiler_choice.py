"""``CompilationConfig(compiler=...)``: Inductor, or a debug compiler to bisect a miscompile.

``"aot_eager"`` runs everything Inductor runs before code generation, the layerpass passes
included (they match as under Inductor), then the post-pass graph as fx; ``"eager"`` runs the
pieces' Dynamo graphs. All three equal eager on the zoo llama; the compiler is in every piece key
and in the warm-start key, and a debug compiler caches nothing (no artifact to save)."""

from __future__ import annotations

import pytest
import torch

from layerpass.backend.pieces.compiler import LayerpassBackend
from layerpass.backend.config import COMPILERS, CompilationConfig
from layerpass.backend.regions.warm_start import model_key_parts
from layerpass.models import build_model
from tests.helpers import backend as bh


def test_bad_compiler_names_the_allowed_values() -> None:
    with pytest.raises(ValueError) as e:
        CompilationConfig(compiler="inductr")
    assert "'inductr'" in str(e.value) and all(repr(c) in str(e.value) for c in COMPILERS)


def test_the_compiler_is_in_the_piece_and_warm_start_keys(tmp_path) -> None:
    model = build_model("llama", num_layers=2)
    parts = {c: LayerpassBackend(CompilationConfig(cache_dir=str(tmp_path), compiler=c), publish_reports=False).key_parts()
             for c in COMPILERS}
    assert len({str(p) for p in parts.values()}) == len(COMPILERS)  # every piece key differs
    models = {c: model_key_parts(model, p) for c, p in parts.items()}
    assert len({m["config.compiler"] for m in models.values()}) == len(COMPILERS)
    assert not CompilationConfig(compiler="aot_eager").caches_pieces and CompilationConfig().caches_pieces


@pytest.mark.slow  # three real compiles of the zoo llama
def test_three_compilers_equal_eager_and_the_passes_match_alike() -> None:
    runs = {c: bh.compile_zoo("llama", 2, compiler=c) for c in COMPILERS}
    for c, run in runs.items():
        bh.assert_matches(run.out, run.ref, f"llama-2 compiler={c}")
        assert run.report.compiler == c
    inductor, aot_eager, eager = (runs[c].report for c in COMPILERS)
    assert inductor.matches and aot_eager.matches == inductor.matches, (aot_eager.matches, inductor.matches)
    assert inductor.matches.get("lowering", 0) > 0
    assert not any(eager.matches.values()), eager.matches  # no passes: the Dynamo graphs as traced
    for report in (aot_eager, eager):
        assert report.warm_start.startswith("off (compiler="), report.warm_start
        assert report.num_cache_hits == 0
    keys = {c: {p.key for p in runs[c].report.pieces if p.kind == "compiled"} for c in COMPILERS}
    assert not keys["inductor"] & keys["aot_eager"] and not keys["aot_eager"] & keys["eager"]


@pytest.mark.slow
def test_aot_eager_pieces_run_fx_not_inductor_code() -> None:
    """The debug compiler's piece is the post-pass fx graph: no Inductor-generated graph runs
    (under Inductor the profile shows each piece's ``## Call CompiledFxGraph <hash> ##``)."""
    run = bh.compile_zoo("llama", 2, compiler="aot_eager")
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        run.step.run(run.compiled)
    names = {e.key for e in prof.key_averages()}
    assert names and not any("CompiledFxGraph" in n for n in names), sorted(names)
