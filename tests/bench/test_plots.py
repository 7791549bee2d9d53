"""``bench/plots.py``: speed-ups over inductor from the timed rows, and the PNGs (with matplotlib)."""

from __future__ import annotations

import pytest

from layerpass.bench.plots import speedups
from layerpass.bench.rows import skipped_row
from tests.bench.fakes import valid_row


def _rows() -> list[dict]:
    rows = []
    for layers, lp, ind in ((2, 10.0, 20.0), (8, 12.0, 60.0)):
        for mode, t in (("layerpass", lp), ("inductor", ind)):
            r = valid_row()
            r.update({"layers": layers, "mode": mode, "first_call_s": t})
            rows.append(r)
    return rows + [skipped_row("llama", 32, "layerpass", "timed out at 8 layers")]


def test_speedups_use_timed_rows_only() -> None:
    assert sorted(speedups(_rows())) == [("llama", "layerpass", 2, 2.0), ("llama", "layerpass", 8, 5.0)]


def test_plots_are_pngs(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from layerpass.bench.plots import make_plots

    for path in make_plots({"rows": _rows()}, str(tmp_path)):
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
