"""A warm start is never stale, and a region never outlives a change of the code it traced.

Across processes: the model lives in a module written to a tmp dir; process 1 compiles and saves,
the test edits what the layer's trace ran through (a helper function, a parent-class method, a
helper object's method, a module constant, a layerpass layer in a copy of the package), and
process 2 on the same cache dir must equal eager of the edited code and name what changed.
In-process: the same edits made by monkeypatching after the first call trace the region again.
"""

from __future__ import annotations

import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.helpers import backend as bh

MODEL = '''
import torch
from torch import nn

FACTOR = 2.0


def helper(x):
    return x * 3.0


class AddOne:  # a helper object that is not a module (like a quant method)
    def apply(self, x):
        return x + 1.0


class Base(nn.Module):
    def act(self, x):
        return torch.relu(x)


class Block(Base):
    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.method = AddOne()

    def forward(self, x):
        y = self.method.apply(self.lin(x))
        return helper(self.act(y)) * FACTOR + x


class Net(nn.Module):
    def __init__(self, layers, width=8):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Block(width) for _ in range(layers))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)
'''

# (edit of the model source, what the fallback must name)
EDITS = {
    "helper function": (("return x * 3.0", "return x * 5.0"), "helper"),
    "parent-class method": (("torch.relu(x)", "torch.sigmoid(x)"), "Base.act"),
    "helper object's method": (("return x + 1.0", "return x - 1.0"), "AddOne.apply"),
    "module constant": (("FACTOR = 2.0", "FACTOR = 4.0"), "FACTOR"),
    "layer's own forward": (("* FACTOR + x", "* FACTOR - x"), "model code"),
}

RUN = """
import logging, sys
sys.path.insert(0, {model_dir!r})
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
import torch, layerpass
from layerpass.backend.config import CompilationConfig
import stale_model
model = stale_model.Net(3).eval()
x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    ref = model(x)
    out = layerpass.compile(model, CompilationConfig(cache_dir={cache_dir!r}))(x)
r = layerpass.last_compile_report()
emit({{"err": (out - ref).abs().max().item(), "warm_start": r.warm_start, "trace": r.trace,
       "dynamo_s": r.dynamo_s}})
"""


def run(model_dir: Path, cache_dir: str, env: dict[str, str] | None = None) -> dict:
    body = textwrap.dedent(RUN.format(model_dir=str(model_dir), cache_dir=cache_dir))
    return bh.run_python(body, env=env, what="stale-check process").result


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Process 1: the original model compiled and saved once; each test copies its cache."""
    model_dir = tmp_path_factory.mktemp("orig")
    (model_dir / "stale_model.py").write_text(MODEL)
    cache = bh.fresh_cache_dir("stale")
    first = run(model_dir, cache)
    assert first["err"] < 1e-5 and first["trace"] == "regions", first
    again = run(model_dir, cache)
    assert again["warm_start"] == "loaded" and again["dynamo_s"] == 0.0 and again["err"] < 1e-5, again
    return model_dir, cache


@pytest.mark.slow
@pytest.mark.parametrize("what", list(EDITS))
def test_an_edit_the_trace_ran_through_is_not_loaded(saved: tuple[Path, str], tmp_path: Path, what: str) -> None:
    _, cache = saved
    (old, new), named = EDITS[what]
    cache_copy = str(tmp_path / "cache")
    shutil.copytree(cache, cache_copy)
    assert old in MODEL
    (tmp_path / "stale_model.py").write_text(MODEL.replace(old, new))
    r = run(tmp_path, cache_copy)
    assert r["err"] < 1e-5, r  # equals eager of the edited code
    assert r["warm_start"].startswith("fallback") and named in r["warm_start"], r


@pytest.mark.slow
def test_another_project_with_the_same_classes_does_not_load_it(saved: tuple[Path, str], tmp_path: Path) -> None:
    """Two projects, one cache dir: same class sources, a different helper."""
    _, cache = saved
    cache_copy = str(tmp_path / "cache")
    shutil.copytree(cache, cache_copy)
    other = MODEL.replace("def helper(x):\n    return x * 3.0", "def helper(x):\n    return x * 3.0 + 1.0")
    (tmp_path / "stale_model.py").write_text(other)
    r = run(tmp_path, cache_copy)
    assert r["err"] < 1e-5 and "helper" in r["warm_start"], r


def _package_copy(dest: Path) -> Path:
    """The layerpass package laid out as installed (``layerpass/``, ``layerpass/ops``, ...) from this checkout."""
    import layerpass

    repo = Path(layerpass.__file__).resolve().parent.parent
    pkg = dest / "layerpass"
    shutil.copytree(repo / "layerpass", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for sub in ("ops", "layers", "patterns", "passes", "backend", "bench", "models"):
        shutil.copytree(repo / sub, pkg / sub, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


ZOO_RUN = """
import sys
sys.path.insert(0, {root!r})  # before the checkout (the working directory) and the editable install
import torch, layerpass
assert layerpass.__file__.startswith({root!r}), layerpass.__file__
from layerpass.backend.config import CompilationConfig
from layerpass.models import build_model, make_step
model = build_model("llama", num_layers=2)
step = make_step(model, num_decodes=1, prefill_lens=[3])
with torch.no_grad():
    ref = step.run(model)
    out = step.run(layerpass.compile(model, CompilationConfig(cache_dir={cache_dir!r})))
r = layerpass.last_compile_report()
emit({{"err": (out - ref).abs().max().item(), "warm_start": r.warm_start}})
"""


@pytest.mark.slow
def test_an_edited_layerpass_layer_is_not_loaded(tmp_path: Path) -> None:
    """layerpass's own ``ColumnParallelLinear.forward`` edited in a copy of the package."""
    root = _package_copy(tmp_path / "pkg")
    cache = bh.fresh_cache_dir("stale-pkg")
    def zoo() -> dict:
        body = textwrap.dedent(ZOO_RUN.format(root=str(root), cache_dir=cache))
        return bh.run_python(body, what="package copy").result

    assert zoo()["err"] < 1e-4
    assert zoo()["warm_start"] == "loaded"
    linear = root / "layerpass" / "layers" / "linear.py"
    linear.write_text(_edit_first_forward_return(linear.read_text(), "class ColumnParallelLinear"))
    r = zoo()
    assert r["err"] < 1e-4, r
    assert r["warm_start"].startswith("fallback") and "ColumnParallelLinear" in r["warm_start"], r


def _edit_first_forward_return(source: str, marker: str) -> str:
    """Scale what ``forward`` of the class at ``marker`` returns (``return out`` -> ``return 0.5 * out``),
    and check that something was edited."""
    head, tail = source.split(marker, 1)
    fwd = tail.index("def forward")
    ret = tail.index("return ", fwd)
    line_end = tail.index("\n", ret)
    value = tail[ret + len("return "):line_end]
    edited = f"return _scaled({value})"
    helper = "\n\ndef _scaled(value):\n    if isinstance(value, tuple):\n        return (value[0] * 0.5, *value[1:])\n    return value * 0.5\n"
    return head + marker + tail[:ret] + edited + tail[line_end:] + helper


# -- in-process ------------------------------------------------------------------------------
def _load_model(tmp_path: Path, name: str):
    import importlib.util

    path = tmp_path / f"{name}.py"
    path.write_text(MODEL)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an imported model file is
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("what", ["helper function", "parent-class method", "helper object's method", "module constant"])
def test_monkeypatch_after_the_first_call_traces_again(tmp_path: Path, what: str) -> None:
    import layerpass
    from layerpass.backend.config import CompilationConfig

    mod = _load_model(tmp_path, f"patched_{what.replace(' ', '_').replace(chr(39), '')}")
    model = mod.Net(3).eval()
    compiled = layerpass.compile(model, CompilationConfig(disable_cache=True))
    x = torch.randn(4, 8)
    with torch.no_grad():
        bh.assert_matches(compiled(x), model(x), "first call")
        if what == "helper function":
            mod.helper = lambda v: v * 5.0
        elif what == "parent-class method":
            mod.Base.act = lambda self, v: torch.sigmoid(v)
        elif what == "helper object's method":
            mod.AddOne.apply = lambda self, v: v - 1.0
        else:
            mod.FACTOR = 4.0
        ref = model(x)
        out = compiled(x)
    bh.assert_matches(out, ref, f"after patching the {what}")
    assert any("traced again" in n for n in layerpass.last_compile_report().notes)


SET_LITERAL_MODEL = '''
import torch
from torch import nn


def helper(x, mode):
    if mode in {"alpha", "beta", "gamma", "delta", "epsilon"}:  # a frozenset constant of the code object
        return x * 2.0
    return x


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return helper(self.lin(x), "gamma") + x


class Net(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.layers = nn.ModuleList(Layer() for _ in range(n))
        self.head = nn.Linear(8, 8)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)
'''


@pytest.mark.slow
def test_a_set_literal_in_traced_code_warm_starts_under_any_hash_seed(tmp_path: Path) -> None:
    (tmp_path / "stale_model.py").write_text(SET_LITERAL_MODEL)
    cache = bh.fresh_cache_dir("seed")
    first = run(tmp_path, cache, env=bh.subprocess_env(PYTHONHASHSEED="1"))
    assert first["trace"] == "regions" and first["err"] < 1e-5, first
    second = run(tmp_path, cache, env=bh.subprocess_env(PYTHONHASHSEED="2"))
    assert second["warm_start"] == "loaded" and second["dynamo_s"] == 0.0 and second["err"] < 1e-5, second
