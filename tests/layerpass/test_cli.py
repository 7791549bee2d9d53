"""The ``layerpass`` command line: argument errors, the entry points, and the sweep's scheduling
(timeouts kill the measurement and skip larger layer counts). No sweep budget: tests/bench/test_sweep.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from layerpass.bench.sweep import validate_results
from layerpass.cli import main


def _error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["bench", "--models", "llama,gpt5"], "unknown model(s) ['gpt5']; registered models: "),
    (["bench", "--modes", "inductor,jit"], "unknown or no modes ['jit']; allowed: layerpass, layerpass-str, inductor, regional"),
    (["bench", "--layers", "2,eight"], "expected comma-separated ints, got '2,eight'"),
    (["bench", "--layers", "0"], "layer counts must be positive ints"),
    (["bench", "--timeout", "-1"], "timeout must be > 0"),
    (["bench", "--jobs", "0"], "jobs must be >= 1"),
    (["doctor"], "--model"),
    (["doctor", "--model", "llama", "--layers", "0"], "--layers must be >= 1"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_exit_2_and_say_what_is_allowed(capsys, argv, message) -> None:
    assert message in _error(capsys, *argv)


def test_registered_models_are_accepted(capsys) -> None:
    """Any model the zoo registers (not only the built-in three) passes validation."""
    from layerpass.models import registered_models

    from layerpass.bench.sweep import check_models

    check_models(registered_models())
    assert "unknown model" in _error(capsys, "bench", "--models", "not-registered")


def test_console_script_and_module_entry_points() -> None:
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "layerpass"]
    assert ep.value == "layerpass.cli:main" and ep.load() is main
    proc = subprocess.run([sys.executable, "-m", "layerpass", "bench", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ("--quick", "--full", "--jobs", "--models", "--layers", "--modes", "--out", "--timeout"):
        assert flag in proc.stdout


def _bench(tmp_path, capsys, *argv: str) -> tuple[dict, str]:
    out = tmp_path / "res"
    assert main(["bench", "--no-plots", "--out", str(out), *argv]) == 0
    with open(out / "results.json") as f:
        doc = json.load(f)
    validate_results(doc)
    return doc, capsys.readouterr().out


def test_timeout_is_recorded_and_skips_larger_layer_counts(tmp_path, capsys) -> None:
    doc, table = _bench(tmp_path, capsys, "--models", "llama", "--layers", "8,2", "--modes", "inductor,layerpass",
                        "--timeout", "1", "--jobs", "2")
    got = [(r["layers"], r["mode"], r["status"], r["reason"]) for r in doc["rows"]]
    assert got == [  # plan order: small layer counts first; each (model, mode) in increasing layers
        (2, "inductor", "timeout", "cold run exceeded 1 s"),
        (2, "layerpass", "timeout", "cold run exceeded 1 s"),
        (8, "inductor", "skipped", "timed out at 2 layers"),
        (8, "layerpass", "skipped", "timed out at 2 layers"),
    ]
    assert doc["rows"][0]["cold_wall_s"] < 30  # killed, not waited for
    assert doc["config"]["jobs"] == 2 and doc["machine"]["cpu_count"] == os.cpu_count()
    assert "| llama | 2 | inductor | timeout |" in table and "**timeout**: cold run exceeded 1 s" in table
