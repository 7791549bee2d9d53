"""The ``layerpass`` command line: argument errors, the entry points and help, the recorded command
line, and a sweep run through it (a fake measurement; one case with real processes that time out)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from layerpass.bench import sweep
from layerpass.bench.schema import validate_results
from layerpass.cli import main
from tests.bench.fakes import FakeMeasure


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
    (["bench", "--quick", "--full"], "not allowed with"),
    (["bench", "--import", "no_such_module_for_layerpass"], "No module named 'no_such_module_for_layerpass'"),
    (["bench", "--quick", "--budget", "0"], "unrecognized arguments: --budget 0"),  # removed: no sweep budget
    (["doctor"], "--model"),
    (["doctor", "--model", "gpt5"], "unknown model 'gpt5'"),
    (["doctor", "--model", "llama", "--layers", "0"], "--layers must be >= 1"),
    (["frobnicate"], "invalid choice"),
    (["step-time", "--layers", "x"], "--layers takes comma-separated integers, got 'x'"),  # step_time's own parser
    (["step-time", "--batches", "prefill"], "--batches: unknown ['prefill']; allowed: decode, mixed"),
    (["precompile", "gpt5", "--layers", "2"], "unknown model 'gpt5'; a zoo name"),
    (["precompile", "llama", "--layers", "0"], "--layers must be >= 1"),
    (["precompile", "llama"], "--layers"),
    (["cache", "export", "--model", "llama"], "cache export needs -o/--output and either --model and --layers, or --all"),
    (["cache", "import"], "cache import needs the bundle file"),
    (["cache", "prune"], "invalid choice"),
])
def test_bad_arguments_exit_2_and_say_what_is_allowed(capsys, argv, message, monkeypatch) -> None:
    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **k: pytest.fail("must not run"))
    assert message in _error(capsys, *argv)


def test_step_time_passes_its_options_to_the_step_time_bench(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["step-time", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: layerpass step-time") and "--hf-config" in out and "--repeats" in out


def test_console_script_module_entry_point_and_help() -> None:
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "layerpass"]
    assert ep.value == "layerpass.cli:main" and ep.load() is main
    proc = subprocess.run([sys.executable, "-m", "layerpass", "bench", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for flag in ("--quick", "--full", "--jobs", "--models", "--layers", "--modes", "--out", "--timeout",
                 "--timeout-scale", "--docs"):
        assert flag in text
    assert "--budget" not in text
    assert "llama, 2 and 80 layers, layerpass vs inductor" in text and "all four modes" in text
    assert "No sweep budget" in text and "default 1" in text


def _bench(tmp_path, capsys, *argv: str) -> tuple[dict, str]:
    out = tmp_path / "res"
    assert main(["bench", "--no-plots", "--out", str(out), *argv]) == 0
    with open(out / "results.json") as f:
        doc = json.load(f)
    validate_results(doc)
    return doc, capsys.readouterr().out


def test_quick_with_a_fake_measurement_records_its_command_line(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sweep, "measure_phase", FakeMeasure(str(tmp_path / "res")))
    docs = tmp_path / "docs"
    doc, out = _bench(tmp_path, capsys, "--quick", "--docs", str(docs))
    res = tmp_path / "res"
    assert [r["status"] for r in doc["rows"]] == ["ok"] * 4
    assert doc["config"]["command"] == f"layerpass bench --quick --out {res} --docs {docs} --no-plots"
    assert (docs / "results.md").read_text() == (res / "results.md").read_text()
    assert out.strip() == (res / "results.md").read_text().strip() and "Acceptance ratios" in out


def test_the_recorded_command_line_has_every_changed_option(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sweep, "measure_phase", FakeMeasure(str(tmp_path / "res")))
    doc, _ = _bench(tmp_path, capsys, "--models", "llama", "--models", "moe", "--layers", "2", "--modes", "inductor",
                    "--timeout-scale", "1.5", "--repeats", "3", "--import", "json", "--strict")
    assert doc["config"]["command"] == (f"layerpass bench --models llama,moe --layers 2 --modes inductor "
                                        f"--out {tmp_path / 'res'} --timeout-scale 1.5 --repeats 3 --import json "
                                        "--no-plots --strict")


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


def test_cache_import_of_a_non_bundle_or_without_a_secret_exits_1(tmp_path, capsys, monkeypatch) -> None:
    bogus = tmp_path / "x.tar"
    bogus.write_bytes(b"no tar here" * 50)
    monkeypatch.setenv("LAYERPASS_CACHE_SECRET", "s")
    assert main(["cache", "import", str(bogus), "--cache-dir", str(tmp_path / "c")]) == 1
    assert "is not a layerpass bundle" in capsys.readouterr().err
    monkeypatch.delenv("LAYERPASS_CACHE_SECRET")
    assert main(["cache", "import", str(bogus), "--cache-dir", str(tmp_path / "c")]) == 1
    assert "LAYERPASS_CACHE_SECRET" in capsys.readouterr().err
