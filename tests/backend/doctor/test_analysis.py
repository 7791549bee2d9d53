"""The uniqueness doctor on a deliberately broken model and on healthy ones.

The test model is a stack of identical blocks. A *broken* block passes its layer name to a
test-only op as a plain ``str`` (baked into the graph as a constant), a healthy one passes a
``LayerName`` built inside ``forward`` (hoisted to a graph input). Which blocks are broken is
known, so the expected findings are computed independently of the doctor: the broken blocks
form one structure with one artifact each (all but one avoidable), the healthy ones share one.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import layerpass
from layerpass.backend.doctor.analysis import DoctorReport, diagnose
from layerpass.backend.doctor.findings import PieceRecord
from tests.helpers import backend as bh
from layerpass.ops import (
    LayerNameType,
    LayerRegistry,
    encode_layer_name,
    layer_registry_scope,
    layerpass_op,
    lookup_layer,
    set_forward_context,
)

HIDDEN = 8


@layerpass_op("doctor_test_scale_by_str", fake=lambda x, name: torch.empty_like(x))
def scale_by_str(x: torch.Tensor, name: str) -> torch.Tensor:
    """Test-only: scales by the named layer's ``gain`` but takes the name as a plain ``str``."""
    return x * lookup_layer(name).gain


@layerpass_op("doctor_test_scale_by_name", fake=lambda x, name: torch.empty_like(x))
def scale_by_name(x: torch.Tensor, name: LayerNameType) -> torch.Tensor:
    """Test-only: the same op done right, the name typed ``LayerNameType``."""
    return x * lookup_layer(name).gain


class Block(nn.Module):
    def __init__(self, prefix: str, broken: bool, gain: float, registry: LayerRegistry) -> None:
        super().__init__()
        self.prefix, self.broken = prefix, broken
        self.proj = nn.Linear(HIDDEN, HIDDEN)
        self.register_buffer("gain", torch.tensor(gain))
        registry.register(prefix, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.proj(x))
        if self.broken:
            h = torch.ops.layerpass.doctor_test_scale_by_str(h, self.prefix)
        else:
            h = torch.ops.layerpass.doctor_test_scale_by_name(h, encode_layer_name(self.prefix))
        return x + h


class Stack(nn.Module):
    def __init__(self, broken: list[bool]) -> None:
        super().__init__()
        with layer_registry_scope(LayerRegistry("doctor-test")) as registry:
            self.embed = nn.Linear(HIDDEN, HIDDEN)
            self.layers = nn.ModuleList(Block(f"layers.{i}", b, 1.0 + 0.25 * i, registry) for i, b in enumerate(broken))
            self.head = nn.Linear(HIDDEN, 3)
        self.registry = registry

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def runner(model: Stack, x: torch.Tensor):
    def run(fn):
        with set_forward_context(None, model.registry):
            return fn(x)

    return run


needs_layername = pytest.mark.skipif(not layerpass.USE_LAYERNAME, reason="the layer-name switch is off in this process")


@needs_layername
@settings(max_examples=6, deadline=None)
@given(broken=st.lists(st.booleans(), min_size=2, max_size=5), tokens=st.integers(1, 6))
def test_findings_match_the_broken_layers(broken: list[bool], tokens: int) -> None:
    torch.manual_seed(0)
    model = Stack(broken).eval()
    report = diagnose(model, runner(model, torch.randn(tokens, HIDDEN)), compile=False)
    n_broken = sum(broken)
    assert report.avoidable == max(0, n_broken - 1)
    assert report.ok == (n_broken <= 1)
    layer_pieces = [p for p in report.pieces if p.layer is not None]
    assert [p.layer for p in layer_pieces] == list(range(len(broken)))
    healthy_keys = {p.key for p, b in zip(layer_pieces, broken) if not b}
    assert len(healthy_keys) <= 1  # every healthy block shares one artifact
    broken_prefixes = {f"layers.{i}" for i, b in enumerate(broken) if b}
    assert len(report.findings) == max(0, n_broken - 1)
    for f in report.findings:
        assert len(f.diffs) == 1
        d = f.diffs[0]
        assert d.op == "layerpass.doctor_test_scale_by_str"
        assert {d.value_a, d.value_b} <= broken_prefixes and d.value_a != d.value_b
        assert d.is_layer_name
        text = f.message()
        assert repr(d.value_b) in text and "layerpass.doctor_test_scale_by_str" in text and "LayerName" in text
    out = report.format()
    assert ("OK" in out) == report.ok and ("PROBLEM" in out) != report.ok


@needs_layername
def test_healthy_model_is_ok_and_all_broken_names_the_constants() -> None:
    model = Stack([False] * 4).eval()
    x = torch.randn(5, HIDDEN)
    healthy = diagnose(model, runner(model, x), compile=False)
    assert healthy.ok and healthy.findings == [] and healthy.num_unique == 3  # prologue, one layer, epilogue
    model = Stack([True] * 3).eval()
    broken = diagnose(model, runner(model, x), compile=False)
    assert broken.avoidable == 2 and not broken.ok
    lines = broken.format().splitlines()
    assert any("pieces submod_1 and submod_2 differ only in the str constant 'layers.1' (vs 'layers.0') passed to "
               "layerpass.doctor_test_scale_by_str: pass a LayerName instead" in ln for ln in lines), lines


def test_report_counts_unique_pieces_structures_and_avoidable_compiles() -> None:
    records = [PieceRecord(name, None, key, shape) for name, key, shape in
               (("p1", "k1", "s"), ("p2", "k2", "s"), ("p3", "k1", "s"), ("p4", "k3", "t"))]
    report = DoctorReport(records, [], compiled=False, use_layername=True)
    assert (report.num_unique, report.num_structures, report.avoidable, report.ok) == (3, 2, 1, False)


def test_bad_arguments_are_named() -> None:
    model = Stack([False, False])
    with pytest.raises(TypeError, match="positional inputs"):
        diagnose(model, 42, compile=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="nn.Module"):
        diagnose(lambda x: x, (torch.randn(2, HIDDEN),), compile=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="CompilationConfig"):
        diagnose(model, (torch.randn(2, HIDDEN),), compile=False, config={"split": "layers"})


def _doctor_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "layerpass", "doctor", *args], capture_output=True, text=True,
                          env=full_env, timeout=300)


@pytest.mark.slow
def test_cli_doctor_moe_with_the_switch_off_exits_nonzero() -> None:
    proc = _doctor_cli("--model", "moe", "--layers", "3", "--no-compile", env={"VLLM_USE_LAYERNAME": "0"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "'model.layers.1.mlp.experts' (vs 'model.layers.0.mlp.experts') passed to layerpass.moe_forward" in proc.stdout
    assert "VLLM_USE_LAYERNAME is off" in proc.stdout


@needs_layername
def test_cli_doctor_moe_healthy_exits_zero() -> None:
    from layerpass.cli import main

    assert main(["doctor", "--model", "moe", "--layers", "3", "--no-compile"]) == 0


def test_cli_doctor_rejects_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    from layerpass.cli import main

    with pytest.raises(SystemExit) as e:
        main(["doctor", "--model", "no-such-model"])
    assert e.value.code == 2
    assert "unknown model 'no-such-model'; registered models:" in capsys.readouterr().err


@pytest.mark.slow
@needs_layername
def test_through_the_real_backend() -> None:
    """compile=True: Inductor compiles each unique piece; the findings match the analysis-only run."""
    model = Stack([True, True, False]).eval()
    x = torch.randn(4, HIDDEN)
    real = diagnose(model, runner(model, x), compile=True)
    fast = diagnose(model, runner(model, x), compile=False)
    assert real.compiled and real.avoidable == 1 == fast.avoidable
    def pattern(report: DoctorReport) -> list[int]:  # which pieces share an artifact (keys themselves differ)
        first: dict[str, int] = {}
        return [first.setdefault(p.key, i) for i, p in enumerate(report.pieces)]

    assert pattern(real) == pattern(fast) == [0, 1, 2, 3, 4]
    assert [f.message() for f in real.findings] == [f.message() for f in fast.findings]


# ---------------------------------------------------------------- the regions path (layerpass.compile)
@needs_layername
@bh.shared_regions
def test_regions_are_diagnosed_per_layer_group() -> None:
    """Broken blocks bake their name in: each is a region and a compile of its own (a finding); the
    healthy block's region differs in structure. A healthy stack is one region, and OK."""
    x = torch.randn(4, HIDDEN)
    broken = Stack([True, True, False]).eval()
    regions = diagnose(broken, runner(broken, x)).regions
    assert regions is not None and regions.trace == "regions" and regions.num_regions == 3, regions
    assert [(g.layer_class, g.layers) for g in regions.groups] == [("Block", [0]), ("Block", [1]), ("Block", [2])]
    assert [(f.piece_a, f.piece_b) for f in regions.findings] == [("layer 0", "layer 1")]
    healthy = Stack([False] * 3).eval()
    report = diagnose(healthy, runner(healthy, x))
    assert report.ok and report.regions.num_regions == 1 and [g.layers for g in report.regions.groups] == [[0, 1, 2]]
    assert "3 decoder layers in 1 region(s)" in report.format()


class Branches(nn.Module):
    """Python control flow on a tensor's value: a graph break, so this layer cannot be a region."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return h if h.sum() > 0 else -h


def test_a_layer_with_a_graph_break_is_named_with_the_reason() -> None:
    model = bh.Chain([Branches(), Branches()]).eval()
    report = diagnose(model, (torch.randn(3, HIDDEN),))
    assert not report.ok and report.regions is not None and report.regions.trace.startswith("eager")
    assert any("Branches cannot be traced as a region" in n for n in report.regions.notes), report.regions.notes
    assert "did not run as regions" in report.format()
