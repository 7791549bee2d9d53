"""``python -m layerpass.bench.step_time``: interleaved steady-state step times, a complete table."""

from __future__ import annotations

import json

import pytest

from layerpass.bench import step_time


@pytest.mark.parametrize("argv, message", [
    (["--batches", "prefill"], "unknown ['prefill']"),
    (["--layers", "two"], "comma-separated integers"),
    (["--repeats", "0"], ">= 1"),
    (["--hf-config", "/nonexistent/config.json"], "no such file"),
])
def test_bad_arguments_are_named(argv, message, capsys) -> None:
    with pytest.raises(SystemExit):
        step_time.main(argv)
    assert message in capsys.readouterr().err


def test_table_has_the_ratios() -> None:
    row = step_time.Row("llama", 16, "decode", 10.0, 7.0, 8.0, 1e-6)
    text = step_time.table([row])
    assert "| llama | 16 | decode | 10.00 | 7.00 | 8.00 | 0.70 | 0.88 |" in text


@pytest.mark.slow
def test_a_small_run_prints_a_complete_table(tmp_path, capsys) -> None:
    out = tmp_path / "rows.json"
    assert step_time.main(["--models", "llama", "--layers", "2", "--batches", "decode", "--repeats", "2",
                           "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and rows[0]["max_abs_err"] < 1e-3
    assert all(rows[0][k] > 0 for k in ("eager_ms", "layerpass_ms", "inductor_ms"))
    assert "layerpass / inductor" in capsys.readouterr().out


def test_the_one_step_method_takes_turns() -> None:
    """``interleaved_ms`` (also the sweep's step column): one step of each fn in turn, every round."""
    from layerpass.bench.step_time import interleaved_ms

    order = []

    class Step:
        def run(self, fn):
            order.append(fn())

    times = interleaved_ms(Step(), {"a": lambda: "a", "b": lambda: "b"}, 3)
    assert order == ["a", "b"] * 3
    assert sorted(times) == ["a", "b"] and all(len(v) == 3 and min(v) >= 0 for v in times.values())
