"""Warm start of converted HF models: a second process loads the saved decoder-layer regions and
runs without Dynamo, with eager's output.

What it takes (torch 2.13, transformers 5.2x): the region trace wrapped in
``backend/regions/torch_patches.saveable_guards`` (dtype singletons, decorated forwards and
instance-bound methods in the saved guards) and ``models/hf/hub_kernels.bypass_kernel_routing``
at conversion (with ``kernels`` installed, its per-model wrappers' local-scope class cannot be
saved). Gemma 2 has two regions (sliding and global layers); Mixtral's is a MoE layer.

Two fresh processes per family on one cache dir, about 30 s each on the shared 2-core box: slow.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from tests.helpers import backend as bh  # noqa: E402

RUN = """
import torch, layerpass
from layerpass.backend.config import CompilationConfig
from layerpass.models import build_model, make_step
model = build_model({name!r}, num_layers=4).eval()
step = make_step(model, num_decodes=2, prefill_lens=[3, 5])
try:
    with torch.no_grad():
        ref = step.run()
        compiled = layerpass.compile(model, CompilationConfig(cache_dir={cache_dir!r}))
        out = step.run(compiled)
finally:
    step.release()
r = layerpass.last_compile_report()
emit({{"err": (out - ref).abs().max().item(), "warm_start": r.warm_start, "trace": r.trace,
       "num_regions": r.num_regions, "dynamo_s": r.dynamo_s, "recompiles": compiled.recompiles}})
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hf-llama", "hf-gemma2", "hf-mixtral"])
def test_second_process_loads_the_regions(name: str) -> None:
    cache = bh.fresh_cache_dir("hf-warm")
    cold = bh.run_python(RUN.format(name=name, cache_dir=cache), what=f"{name} cold process").result
    assert cold["trace"] == "regions" and cold["warm_start"].startswith("fallback: no saved program"), cold
    warm = bh.run_python(RUN.format(name=name, cache_dir=cache), what=f"{name} warm process").result
    assert warm["warm_start"] == "loaded" and warm["trace"] == "regions", warm
    assert warm["dynamo_s"] == 0.0 and warm["recompiles"] == 0, warm
    assert warm["num_regions"] == cold["num_regions"], (cold, warm)
    assert warm["err"] < bh.ATOL and cold["err"] < bh.ATOL, (cold, warm)
