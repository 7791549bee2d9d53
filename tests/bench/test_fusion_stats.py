"""``python -m layerpass.bench.fusion_stats``: the table, and a failed point that keeps its row."""

from __future__ import annotations

import pytest

from layerpass.bench import fusion_stats
from layerpass.bench.runner import FreshRunError

ON = {"use_layername": True, "layers": 2, "registrations": {"fuse_attn_quant": 1, "fuse_norm_quant": 2},
      "pass_time_s": {"fuse_attn_quant": 0.25, "fuse_norm_quant": 0.5, "lowering": 9.0},
      "matches": {"fuse_attn_quant": 2, "fuse_norm_quant": 4}, "matches_compiled": {"fuse_attn_quant": 1},
      "num_compiled": 2, "num_pieces": 2}


def test_the_table_sums_the_fusion_passes() -> None:
    lines = fusion_stats.format_table([ON]).splitlines()
    assert lines[2] == "on | 2 | 2 | 2 | 3 (attn_quant=1, norm_quant=2) | 0.750 | 2/4/0/0 | 1/0/0/0"


def test_a_failed_point_keeps_its_row(monkeypatch, capsys) -> None:
    def fake_measure(model, layers, use_layername, timeout=1800):
        if not use_layername:
            raise FreshRunError(f"fusion_stats child ({model}, {layers} layers, switch off) failed with exit code 1: boom")
        return {**ON, "layers": layers}

    monkeypatch.setattr(fusion_stats, "measure", fake_measure)
    assert fusion_stats.main(["--layers", "2"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("on | 2 | 2 |") and lines[3] == "off | 2 | - | - | - | - | - | -"
    assert lines[4] == "fusion_stats child (llama-fp8, 2 layers, switch off) failed with exit code 1: boom"


def test_layer_counts_must_be_positive() -> None:
    with pytest.raises(ValueError, match="layers must be >= 1"):
        fusion_stats.measure("llama", 0, True)
