"""``backend/doctor/regions_report.py`` on hand-built ``CompileReport``s (no compiling).

The layers of a regions report are grouped by the compiled pieces their programs run, named by
their class; layers whose pieces differ only in constants are findings; a report of another path
says so, with its notes. ``diagnose`` running it on a real model: ``test_doctor.py``.
"""

from __future__ import annotations

from torch import nn

from layerpass.backend.doctor.regions_report import read_regions_report
from layerpass.backend.report.compile_report import CompileReport, PieceInfo


class First(nn.Linear):
    pass


class Rest(nn.Linear):
    pass


def model_of(*classes: type) -> nn.Module:
    model = nn.Module()
    model.layers = nn.ModuleList(cls(2, 2) for cls in classes)
    return model


def piece(layer: int, key: str, shape_key: str, source: str, value: str | None = None) -> PieceInfo:
    constants = [("n", "mylib.op.default", value)] if value is not None else []
    return PieceInfo("submod_0", "compiled", key, layer, source, constants, shape_key)


def regions_report(*pieces: PieceInfo, num_regions: int) -> CompileReport:
    report = CompileReport(trace="regions", num_regions=num_regions, warm_start="saved",
                           matches={"fuse_norm_quant": 4, "lowering": 0})
    report.pieces.extend(pieces)
    return report


def test_layers_are_grouped_by_their_pieces_and_named_by_class() -> None:
    report = regions_report(piece(0, "k0", "s0", "compiled"), piece(1, "k1", "s1", "compiled"),
                            piece(2, "k1", "s1", "shared"), piece(3, "k1", "s1", "shared"), num_regions=2)
    d = read_regions_report(report, model_of(First, Rest, Rest, Rest))
    assert [(g.layer_class, g.layers, g.keys, g.source) for g in d.groups] == [
        ("First", [0], ("k0",), "compiled"), ("Rest", [1, 2, 3], ("k1",), "compiled")]
    assert d.ok and d.findings == [] and d.num_regions == 2 and d.warm_start == "saved"
    text = d.format()
    assert "4 decoder layers in 2 region(s), 2 distinct compiled program(s)" in text
    assert "Rest layers 1-3: 1 piece(s)" in text and "fuse_norm_quant 4" in text and "lowering" not in text


def test_layers_compiled_apart_only_for_a_constant_are_findings() -> None:
    """With layer names as ``str`` constants every layer is a region and a compile of its own."""
    report = regions_report(*(piece(i, f"k{i}", "s", "compiled", f"layers.{i}") for i in range(3)), num_regions=3)
    d = read_regions_report(report, model_of(Rest, Rest, Rest))
    assert [g.layers for g in d.groups] == [[0], [1], [2]]
    assert [(f.piece_a, f.piece_b) for f in d.findings] == [("layer 0", "layer 1"), ("layer 0", "layer 2")]
    assert all(f.diffs[0].is_layer_name for f in d.findings) and not d.ok
    assert "PROBLEM: 2 region program(s) compiled only for their constants" in d.format()


def test_a_model_that_left_regions_says_why() -> None:
    why = "Breaks cannot be traced as a region (Unsupported: graph break)"
    report = CompileReport(trace="eager (this step; whole-model from the next)", notes=[why])
    d = read_regions_report(report, model_of(Rest, Rest))
    assert not d.ok and d.groups == []
    assert d.format().splitlines() == [
        "PROBLEM: layerpass.compile: the decoder layers did not run as regions "
        "(trace: eager (this step; whole-model from the next))",
        f"  - {why}"]
