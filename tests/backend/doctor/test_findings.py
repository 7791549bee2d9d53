"""``backend/doctor/findings.py``: pieces equal except for constants, on hand-built records (no compiling)."""

from __future__ import annotations

from torch import nn

from layerpass.backend.doctor.findings import PieceRecord, find_avoidable, op_label


def test_findings_on_hand_built_records() -> None:
    """The grouping logic alone: equal shape_key + different key -> finding; a non-str difference says so."""
    a = PieceRecord("p1", 1, "k1", "s", [("n1", "mylib.op.default", "x.1")])
    b = PieceRecord("p2", 2, "k2", "s", [("n7", "mylib.op.default", "x.2")])
    c = PieceRecord("p3", 3, "k1", "s", [("n9", "mylib.op.default", "x.1")])
    d = PieceRecord("p4", 4, "k3", "s", [("n9", "mylib.op.default", "x.1")])
    e = PieceRecord("p5", None, "k4", "t", [])
    findings = find_avoidable([a, b, c, d, e])
    assert [(f.piece_a, f.piece_b) for f in findings] == [("p1", "p2"), ("p1", "p4")]
    assert findings[0].diffs[0].op == "mylib.op" and not findings[0].diffs[0].is_layer_name
    assert "baked into the graph" in findings[0].advice
    assert findings[1].diffs == [] and "non-str constants" in findings[1].message()


def test_a_constant_naming_a_module_of_the_model_is_a_layer_name() -> None:
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    a = PieceRecord("p1", 0, "k1", "s", [("n1", "mylib.op.default", "layers.0")])
    b = PieceRecord("p2", 1, "k2", "s", [("n1", "mylib.op.default", "layers.1")])
    (finding,) = find_avoidable([a, b], model)
    assert finding.diffs[0].is_layer_name and "baked into the graph" not in finding.advice  # layer-name advice
    assert not find_avoidable([a, b])[0].diffs[0].is_layer_name  # without the model, nothing says it names a layer


def test_op_label() -> None:
    assert op_label("layerpass.moe_forward.default") == "layerpass.moe_forward"
    assert op_label("torch._ops.layerpass.some_module_noise.moe_forward") == "layerpass.moe_forward"
    assert op_label("aten.add.Tensor") == "aten.add.Tensor"
