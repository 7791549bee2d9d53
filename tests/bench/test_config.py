"""``bench/config.py``: resolving a sweep's rows, its checks, and per-process time limits (no budget)."""

from __future__ import annotations

import pytest

from layerpass.bench.config import SweepConfig, check_models, config_record, timeout_for
from layerpass.bench.measure import MODES
from layerpass.bench.presets import preset_units


def test_rows_come_from_the_preset_or_the_axes_given() -> None:
    assert SweepConfig().units == preset_units("default") and SweepConfig().sweep_name == "default"
    assert SweepConfig(preset="quick").units == preset_units("quick")
    custom = SweepConfig(models=("moe",))  # the rest from the preset: layers 2,8,32,80, layerpass vs inductor
    assert custom.units == tuple(("moe", n, mode) for n in (2, 8, 32, 80) for mode in ("layerpass", "inductor"))
    assert custom.sweep_name == "custom"
    assert SweepConfig(preset="quick", modes=("layerpass",)).units == (("llama", 2, "layerpass"), ("llama", 80, "layerpass"))
    assert SweepConfig(preset="full", models=("llama",), layers=(2,)).modes == MODES
    cfg = SweepConfig(models=("llama",), layers=(8, 2), modes=("inductor", "layerpass"))
    assert cfg.units == (("llama", 2, "inductor"), ("llama", 2, "layerpass"), ("llama", 8, "inductor"),
                         ("llama", 8, "layerpass"))
    assert cfg.layers == (2, 8) and cfg.modes == ("inductor", "layerpass")


@pytest.mark.parametrize("bad, message", [
    ({"modes": ("jit",)}, "unknown or no modes"), ({"layers": (0,)}, "positive"), ({"preset": "huge"}, "preset"),
    ({"timeout_s": 0}, "timeout"), ({"timeout_scale": -1}, "scale"), ({"jobs": 0}, "jobs"), ({"models": ()}, "no models"),
])
def test_bad_configs_are_refused(bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SweepConfig(**bad)


def test_time_limits_scale_with_size_and_are_generous() -> None:
    assert not hasattr(SweepConfig(), "budget_s")  # no sweep budget
    assert timeout_for(2) == 340 and timeout_for(80) == 1900 and timeout_for(80, 2.0) == 3800
    cfg = SweepConfig()
    assert cfg.jobs == 1
    assert [cfg.timeout(n) for n in (2, 8, 32, 80)] == [timeout_for(n) for n in (2, 8, 32, 80)]
    assert SweepConfig(timeout_s=7).timeout(80) == 7 and SweepConfig(timeout_scale=3).timeout(2) == 1020
    # far above what any default row needs on the reference machine (inductor at 80 layers: about 2 minutes)
    assert min(timeout_for(n) / (15 + 1.2 * n) for n in (2, 8, 32, 80)) > 10


def test_the_record_has_the_rows_and_limits_but_not_the_environment() -> None:
    record = config_record(SweepConfig(preset="quick", extra_env={"X": "1"}))
    assert record["units"] == [["llama", 2, "layerpass"], ["llama", 2, "inductor"], ["llama", 80, "layerpass"],
                               ["llama", 80, "inductor"]]
    assert record["sweep"] == "quick" and record["timeouts_s"] == {"2": 340.0, "80": 1900.0}
    assert "extra_env" not in record


def test_models_must_be_registered() -> None:
    from layerpass.models import registered_models

    check_models(registered_models())  # any model the zoo registers, not only the built-in three
    with pytest.raises(ValueError, match=r"unknown model\(s\) \['gpt5'\]; registered models: "):
        check_models(["llama", "gpt5"])
    with pytest.raises(ImportError):
        check_models(["llama"], imports=["no_such_module_for_layerpass"])
