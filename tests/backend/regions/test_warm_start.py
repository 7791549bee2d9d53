"""Warm start: a new process loads the saved region programs and runs without tracing.

Every case runs fresh processes on one cache dir. The model lives in a module written to a tmp
dir, so a test can change its code or config between processes. Each fallback (changed code,
changed config, a corrupted or truncated entry, a missing artifact) logs one line saying why,
traces and compiles again, and still equals eager; concurrent writers leave a usable cache.
"""

from __future__ import annotations

import glob
import os
import textwrap
from pathlib import Path

import pytest

from layerpass.backend.pieces.isa_probe import PROBE_SPAN
from tests.helpers import backend as bh

MODEL_SOURCE = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x):
        return torch.relu(self.lin(x)) * {factor} + x


class Net(nn.Module):
    def __init__(self, layers, width={width}):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Block(width) for _ in range(layers))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)
'''

RUN = """
import logging, sys
sys.path.insert(0, {model_dir!r})
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
import torch, layerpass
from layerpass.backend.config import CompilationConfig
import warm_model
if {forbid_tracing}:
    import torch._dynamo.convert_frame as cf, torch._dynamo.symbolic_convert as sc
    def refuse(*a, **k):
        raise AssertionError("Dynamo traced in a warm start")
    cf.fullgraph_capture = refuse
    sc.InstructionTranslator.run = refuse
model = warm_model.Net({layers}).eval()
x = torch.randn(5, model.head.in_features, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    ref = model(x)
    compiled = layerpass.compile(model, CompilationConfig(cache_dir={cache_dir!r}))
    out = compiled(x)
    out7 = compiled(torch.randn(7, model.head.in_features))
r = layerpass.last_compile_report()
emit({{"err": (out - ref).abs().max().item(), "warm_start": r.warm_start, "dynamo_s": r.dynamo_s,
       "num_compiled": r.num_compiled, "num_regions": r.num_regions, "trace": r.trace,
       "recompiles": compiled.recompiles, "timeline": [s.what for s in r.timeline]}})
"""


def write_model(model_dir: Path, factor: float = 2.0, width: int = 8) -> None:
    (model_dir / "warm_model.py").write_text(MODEL_SOURCE.format(factor=factor, width=width))


def run(model_dir: Path, cache_dir: str, *, layers: int = 4, forbid_tracing: bool = False, start: bool = False):
    body = RUN.format(model_dir=str(model_dir), cache_dir=cache_dir, layers=layers, forbid_tracing=forbid_tracing)
    if start:
        return bh.start_python(textwrap.dedent(body))
    return bh.run_python(textwrap.dedent(body), what="warm-start process")


def assert_ok(proc) -> dict:
    r = proc.result
    assert r["err"] < 1e-5, r
    assert r["trace"] == "regions" and r["recompiles"] == 0, r
    return r


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    write_model(tmp_path)
    return tmp_path


def saved_programs(cache_dir: str) -> list[str]:
    return glob.glob(os.path.join(cache_dir, "programs", "*", "*", "*.bin"))


@pytest.mark.slow
def test_warm_start_traces_nothing(model_dir: Path) -> None:
    cache = bh.fresh_cache_dir("warm")
    cold = assert_ok(run(model_dir, cache))
    assert cold["num_compiled"] == 1 and cold["warm_start"].startswith("fallback: no saved program"), cold
    assert len(saved_programs(cache)) == 1
    warm = assert_ok(run(model_dir, cache, forbid_tracing=True))
    assert warm["warm_start"] == "loaded" and warm["num_compiled"] == 0 and warm["dynamo_s"] == 0.0, warm
    assert warm["num_regions"] == cold["num_regions"] == 1
    # the timeline says where each first call went
    assert {"trace Block (Dynamo, then its pieces' compile)", "compile piece submod_0 (inductor)", "save program Block",
            PROBE_SPAN + " (probe)"} <= set(cold["timeline"]), cold["timeline"]
    assert "load pieces (a saved program's artifacts)" not in cold["timeline"]
    assert {"load programs Block", "load pieces (a saved program's artifacts)"} <= set(warm["timeline"]), warm
    assert not any(s.startswith(("trace ", "compile piece", "save program")) for s in warm["timeline"]), warm
    # the cold process saved this machine's ISA probe answer: the warm one takes it instead of probing
    assert PROBE_SPAN + " (this machine's saved answer)" in warm["timeline"], warm


@pytest.mark.slow
def test_deeper_model_of_the_same_code_is_another_key(model_dir: Path) -> None:
    """Layer count is part of the key: a saved 4-layer program is not offered to an 8-layer model."""
    cache = bh.fresh_cache_dir("depth")
    assert_ok(run(model_dir, cache, layers=4))
    proc = run(model_dir, cache, layers=8)
    r = assert_ok(proc)
    assert "model config and structure" in r["warm_start"], r
    assert "changed since the nearest save: model config and structure" in proc.stderr


@pytest.mark.slow
def test_changed_code_recompiles_with_the_reason(model_dir: Path) -> None:
    cache = bh.fresh_cache_dir("code")
    assert_ok(run(model_dir, cache))
    write_model(model_dir, factor=3.0)  # the layer computes something else now
    proc = run(model_dir, cache)
    r = assert_ok(proc)  # equal to the NEW eager
    assert r["warm_start"].startswith("fallback") and "model code" in r["warm_start"], r
    assert "warm start: no saved program for this model: changed since the nearest save: model code" in proc.stderr


@pytest.mark.slow
def test_changed_config_recompiles_with_the_reason(model_dir: Path) -> None:
    cache = bh.fresh_cache_dir("config")
    assert_ok(run(model_dir, cache))
    write_model(model_dir, width=16)  # same code shape, another structure
    proc = run(model_dir, cache)
    r = assert_ok(proc)
    assert "model" in r["warm_start"] and r["warm_start"].startswith("fallback"), r
    assert "warm start:" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "garble", "missing-artifacts"])
def test_damaged_entry_recompiles_then_loads_again(model_dir: Path, damage: str) -> None:
    cache = bh.fresh_cache_dir("damage")
    assert_ok(run(model_dir, cache))
    (entry,) = saved_programs(cache)
    if damage == "truncate":
        with open(entry, "r+b") as f:
            f.truncate(os.path.getsize(entry) // 2)
    elif damage == "garble":
        with open(entry, "r+b") as f:
            f.seek(os.path.getsize(entry) - 64)
            f.write(b"\xde\xad\xbe\xef" * 8)
    else:
        import shutil

        shutil.rmtree(os.path.join(cache, "artifacts"))
    proc = run(model_dir, cache)
    r = assert_ok(proc)
    assert r["warm_start"].startswith("fallback") and "unusable" in r["warm_start"], r
    assert "unusable" in proc.stderr
    if damage == "missing-artifacts":  # the program was saved but its piece is gone: compiled again
        assert r["num_compiled"] == 1, r
    again = assert_ok(run(model_dir, cache, forbid_tracing=True))
    assert again["warm_start"] == "loaded", again


@pytest.mark.slow
def test_concurrent_writers_leave_a_usable_cache(model_dir: Path) -> None:
    cache = bh.fresh_cache_dir("concurrent")
    procs = [run(model_dir, cache, start=True) for _ in range(2)]
    for p in procs:
        assert_ok(bh.finish_python(p, what="concurrent writer"))
    assert 1 <= len(saved_programs(cache)) <= 2
    assert not glob.glob(os.path.join(cache, "programs", "*", "*", ".tmp-*")), "a temporary file was left behind"
    warm = assert_ok(run(model_dir, cache, forbid_tracing=True))
    assert warm["warm_start"] == "loaded"


def test_disable_cache_saves_nothing(tmp_path: Path) -> None:
    import torch

    import layerpass
    from layerpass.backend.config import CompilationConfig

    cache = str(tmp_path / "cache")
    model = bh.Stack(3).eval()
    with torch.no_grad():
        layerpass.compile(model, CompilationConfig(cache_dir=cache, disable_cache=True))(torch.randn(4, 8))
    r = layerpass.last_compile_report()
    assert r.trace == "regions" and r.warm_start.startswith("off")
    assert not os.path.exists(os.path.join(cache, "programs"))


def test_passes_added_after_compile_are_in_the_saved_program_key(tmp_path: Path) -> None:
    import torch

    import layerpass
    from layerpass.backend.config import CompilationConfig
    from layerpass.passes.base import LayerpassPass

    class Extra(LayerpassPass):
        name = "extra_for_key_test"

        def apply(self, graph) -> int:
            return 0

    model = bh.Stack(2).eval()
    compiled = layerpass.compile(model, CompilationConfig(cache_dir=str(tmp_path)))
    before = compiled.backend.pass_manager.uuid()
    compiled.backend.pass_manager.add_pass(Extra())
    with torch.no_grad():
        compiled(torch.randn(3, 8))
    assert compiled.regions is not None and compiled.regions.store is not None
    key_uuid = compiled.regions.store.parts["pass uuids"]
    assert key_uuid == compiled.backend.pass_manager.uuid()[:24] != before[:24]


HF_RUN = """
import sys
import torch, layerpass, transformers
from layerpass.backend.config import CompilationConfig
from layerpass.models import from_config, make_step
if {forbid_tracing}:
    import torch._dynamo.convert_frame as cf
    def refuse(*a, **k):
        raise AssertionError("Dynamo traced in a warm start")
    cf.fullgraph_capture = refuse
cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2)
torch.manual_seed(0)
model = from_config(cfg)
step = make_step(model, num_decodes=2, prefill_lens=[5, 3])
ref = step.run(model)
out = step.run(layerpass.compile(model, CompilationConfig(cache_dir={cache_dir!r})))
r = layerpass.last_compile_report()
emit({{"err": (out - ref).abs().max().item(), "warm_start": r.warm_start, "trace": r.trace}})
"""


@pytest.mark.slow
def test_converted_hf_model_warm_starts() -> None:
    """A converted HF model: its saved program loads, or (torch 2.13 cannot restore the guards of
    transformers' decoder-layer frames) nothing is saved and every process is correct."""
    pytest.importorskip("transformers")
    cache = bh.fresh_cache_dir("hf-warm")
    cold = bh.run_python(textwrap.dedent(HF_RUN.format(cache_dir=cache, forbid_tracing=False)), what="hf cold").result
    assert cold["err"] < 1e-4 and cold["trace"] == "regions", cold
    if cold["warm_start"].startswith("off: ") and "cannot be saved" in cold["warm_start"]:
        # torch 2.13 cannot restore the guards of transformers' decoder-layer frames: nothing was
        # saved, and the next process traces again (correctly) instead of loading a broken entry
        assert not glob.glob(os.path.join(cache, "programs", "*", "*", "*.bin"))
        again = bh.run_python(textwrap.dedent(HF_RUN.format(cache_dir=cache, forbid_tracing=False)), what="hf again").result
        assert again["err"] < 1e-4 and again["warm_start"].startswith("off: "), again
        return
    warm = bh.run_python(textwrap.dedent(HF_RUN.format(cache_dir=cache, forbid_tracing=True)), what="hf warm").result
    assert warm["err"] < 1e-4 and warm["warm_start"] == "loaded", warm


def test_model_key_counts_attribute_values_and_strings() -> None:
    """The saved-program key takes Python attributes by value (a region match leaves them to guards)."""
    from layerpass.backend.regions.signature import layer_signature
    from layerpass.backend.regions.warm_start import model_key_parts

    part = "model config and structure"
    base = bh.Stack(2)
    other_float, other_str = bh.Stack(2), bh.Stack(2)
    other_float.layers[1].eps = 1e-5
    base.layers[1].eps = 1e-6
    other_str.layers[1].eps = 1e-6
    other_str.layers[1].mode = "b"
    base.layers[1].mode = other_float.layers[1].mode = "a"
    keys = [model_key_parts(m, {})[part] for m in (base, other_float, other_str)]
    assert len(set(keys)) == 3, keys
    assert layer_signature(base.layers[1]) == layer_signature(other_float.layers[1]) == layer_signature(other_str.layers[1])


ADD_PASS_RUN = """
import sys
sys.path.insert(0, {model_dir!r})
import torch, layerpass
from layerpass.backend.config import CompilationConfig
from layerpass.passes.base import LayerpassPass
import warm_model

class CountedPass(LayerpassPass):
    name = "counted_for_warm_test"
    runs = 0

    def apply(self, graph) -> int:
        CountedPass.runs += 1
        return 0

model = warm_model.Net(3).eval()
compiled = layerpass.compile(model, CompilationConfig(cache_dir={cache_dir!r}, compile_sizes=(6,)))
compiled.backend.pass_manager.add_pass(CountedPass())
with torch.no_grad():
    out3 = compiled(torch.randn(3, model.head.in_features))
    runs_before_static = CountedPass.runs
    x6 = torch.randn(6, model.head.in_features)
    err6 = (compiled(x6) - model(x6)).abs().max().item() if {static} else 0.0
emit({{"warm_start": layerpass.last_compile_report().warm_start, "runs_before_static": runs_before_static,
       "runs": CountedPass.runs, "err6": err6}})
"""


@pytest.mark.slow
def test_static_size_variant_after_a_warm_load_runs_passes_added_with_add_pass(model_dir: Path) -> None:
    """A warm-loaded program compiles its ``compile_sizes`` variants with the compiled model's own
    backend: a pass added with ``add_pass`` runs on them (it used to be missing: a fresh backend)."""
    cache = bh.fresh_cache_dir("add-pass")
    # the cold process never runs 6 tokens: the variant is first compiled after the warm load
    # (and is not in Inductor's cache, which would skip the passes)
    cold = bh.run_python(textwrap.dedent(ADD_PASS_RUN.format(model_dir=str(model_dir), cache_dir=cache, static=False)),
                         what="add_pass cold").result
    assert cold["runs"] > 0, cold
    warm = bh.run_python(textwrap.dedent(ADD_PASS_RUN.format(model_dir=str(model_dir), cache_dir=cache, static=True)),
                         what="add_pass warm").result
    assert warm["warm_start"] == "loaded" and warm["runs_before_static"] == 0, warm
    assert warm["err6"] < 1e-5 and warm["runs"] > 0, warm


@pytest.mark.slow
def test_a_miss_names_the_config_field_that_changed() -> None:
    first = bh.compile_zoo("llama", 2)
    assert bh.compile_zoo("llama", 2, cache_dir=first.cache_dir).report.warm_start == "loaded"
    other = bh.compile_zoo("llama", 2, cache_dir=first.cache_dir, custom_ops=("all",))
    # the lowering pass's uuid covers which ops it lowers: the two fields that key what custom_ops changes
    assert other.report.warm_start == ("fallback: no saved program for this model: changed since the nearest save: "
                                       "config.custom_ops, pass uuids"), other.report.warm_start


@pytest.mark.slow
def test_the_key_ignores_unrelated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a launcher sets per engine or rank (a Ray bundle index, a rank, a host name) must not
    fragment the cache: the program is keyed on what the compiled code depends on."""
    first = bh.compile_zoo("llama", 2)
    for name, value in [("RANK", "3"), ("LOCAL_RANK", "3"), ("VLLM_RAY_BUNDLE_INDEX", "7"), ("CUDA_VISIBLE_DEVICES", "3"),
                        ("LAYERPASS_REMOTE_CACHE", ""), ("LAYERPASS_CACHE_SECRET", "x"), ("HOSTNAME", "replica-9")]:
        monkeypatch.setenv(name, value)
    again = bh.compile_zoo("llama", 2, cache_dir=first.cache_dir, lock_timeout_s=5.0)
    assert again.report.warm_start == "loaded" and again.report.num_compiled == 0
