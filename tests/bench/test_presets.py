"""``bench/presets.py``: the named sweeps' rows, run order and the axes a custom sweep borrows."""

from __future__ import annotations

import pytest

from layerpass.bench.measure import MODES
from layerpass.bench.presets import preset_axes, preset_units


def test_quick_is_the_four_llama_acceptance_rows() -> None:
    assert preset_units("quick") == (("llama", 2, "layerpass"), ("llama", 2, "inductor"), ("llama", 80, "layerpass"),
                                     ("llama", 80, "inductor"))


def test_default_and_full() -> None:
    default = preset_units("default")
    assert len(default) == len(set(default)) == 20
    assert {(n, mode) for m, n, mode in default if m == "llama" and mode in ("layerpass", "inductor")} == \
        {(n, mode) for n in (2, 8, 32, 80) for mode in ("layerpass", "inductor")}
    for model in ("llama-fp8", "moe"):
        assert sorted((n, mode) for m, n, mode in default if m == model) == \
            [(2, "inductor"), (2, "layerpass"), (80, "inductor"), (80, "layerpass")]
    assert sorted((n, mode) for m, n, mode in default if mode in ("layerpass-str", "regional")) == \
        [(2, "layerpass-str"), (2, "regional"), (8, "layerpass-str"), (8, "regional")]
    assert default[:8] == tuple(("llama", n, mode) for n in (2, 8, 32, 80) for mode in ("layerpass", "inductor"))
    full = preset_units("full")
    assert len(full) == 48 and set(default) <= set(full) and set(preset_units("quick")) <= set(default)


@pytest.mark.parametrize("name", ["quick", "default", "full"])
def test_each_model_and_mode_runs_its_layer_counts_in_increasing_order(name: str) -> None:
    units = preset_units(name)
    for model, _, mode in units:
        seq = [n for m, n, md in units if (m, md) == (model, mode)]
        assert seq == sorted(seq)


def test_axes_and_unknown_presets() -> None:
    assert preset_axes("default") == (("llama", "llama-fp8", "moe"), (2, 8, 32, 80), ("layerpass", "inductor"))
    assert preset_axes("full")[2] == MODES
    for call in (preset_units, preset_axes):
        with pytest.raises(ValueError, match="unknown preset 'huge'; allowed: default, quick, full"):
            call("huge")
