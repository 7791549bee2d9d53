"""``layerpass gpu-check``: the CPU run (Triton interpreter, tiny cases) prints the full table, and its parts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from layerpass.bench import gpu_check
from layerpass.bench.case import build_case, to_device
from layerpass.bench.kernels import build_cases
from tests.helpers import backend as bh


@pytest.mark.slow
def test_cpu_run_fills_every_row_or_says_why(tmp_path) -> None:
    pytest.importorskip("triton", reason="triton is not installed (optional extra: pip install 'layerpass[triton]')")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "layerpass", "gpu-check", "--device", "cpu", "--out", str(out)],
                          env=bh.subprocess_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads((out / "gpu_check.json").read_text())
    rows = doc["rows"]
    table = (out / "gpu_check.md").read_text()
    assert proc.stdout.strip() == table.strip()
    assert table.count("\n| ") == len(rows) + 2  # the header and its rule, then one line per row
    for r in rows:
        assert r["status"] in ("ok", "skipped"), r
        assert (r["result"] if r["status"] == "ok" else r["why"]), r  # filled, or why not
    checks = {r["check"]: r for r in rows}
    kernels = [c.name for c in build_cases("cpu", torch.float32, tiny=True)]
    for dtype in gpu_check.KERNEL_DTYPES:
        for name in kernels:
            (row,) = [r for c, r in checks.items() if c.startswith(f"{name} ({dtype})")]
            assert row["status"] == "ok" and row["figures"]["max_abs_diff"] >= 0, row
    fusions = {r["check"]: r for r in rows if r["section"] == "fusion"}
    assert set(fusions) == set(gpu_check.fusion_names())
    assert all(r["status"] == "ok" for r in fusions.values()), fusions
    for mode in ("layerpass", "inductor"):
        row = checks[f"llama-fp8 x2: {mode} cold / warm"]
        assert row["status"] == "ok" and row["figures"]["warm_s"] > 0, row
    assert checks["llama-fp8 x2: layerpass cold / warm"]["figures"]["warm_start"] == "loaded"
    for mode in ("eager", "layerpass", "inductor"):
        assert checks[f"llama-fp8 x2: {mode}"]["status"] == "ok"
    for mode in ("layerpass+cudagraphs", "inductor+cudagraphs"):
        assert checks[f"llama-fp8 x2: {mode}"]["why"] == "CUDA graphs need a CUDA device"
    assert sum(r["status"] == "skipped" and "Llama-3.2-1B" in r["check"] for r in rows) == 2


def test_a_spent_budget_skips_the_rest_and_says_why() -> None:
    plan = gpu_check.Plan.for_device("cpu", budget_s=1e-9, repeats=1)
    rows = gpu_check.run(plan, ["compile", "fusion", "step"])
    measured = [r for r in rows if "Llama-3.2-1B" not in r.check]
    assert measured and all(r.status == "skipped" and "budget" in r.why for r in measured), rows


def test_tolerances_follow_the_dtype() -> None:
    assert gpu_check.close_enough("rms_norm", "bf16", 0.03, 1.0)
    assert not gpu_check.close_enough("rms_norm", "fp16", 0.03, 1.0)
    assert gpu_check.close_enough("rms_norm+fp8", "fp16", 0.1 * 448, 448.0)  # within one e4m3 step
    assert not gpu_check.close_enough("rms_norm+fp8", "fp16", 0.2 * 448, 448.0)


def test_table_marks_skipped_and_failed_rows_with_why() -> None:
    rows = [gpu_check.Row("kernel", "a", "ok", "max abs diff 0"),
            gpu_check.Row("step", "b", "skipped", why="CUDA graphs need a CUDA device"),
            gpu_check.Row("compile", "c", "FAIL", "x | y", why="boom")]
    table = gpu_check.markdown(rows, "head")
    assert "| step | b | skipped | (CUDA graphs need a CUDA device) |" in table
    assert "| compile | c | FAIL | x / y (boom) |" in table
    assert table.endswith("3 rows: 1 ok, 1 failed, 1 skipped.")


def test_to_device_moves_model_and_step_and_keeps_the_output() -> None:
    model, step = build_case("llama-fp8", 2)
    before = step.run(model)
    to_device(model, step, "cpu")  # the CUDA path, on CPU: every tensor re-homed, metadata rebuilt
    assert torch.equal(step.run(model), before)


def test_recurrent_models_stay_on_cpu() -> None:
    model, step = build_case("bailing-hybrid", 2)
    with pytest.raises(ValueError, match="recurrent state"):
        to_device(model, step, "cpu")


def test_without_cuda_it_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the message printed on machines without CUDA")
    assert gpu_check.main(["--out", "unused"]) == 2
    assert "--device cpu" in capsys.readouterr().err


def test_bad_arguments_are_usage_errors() -> None:
    from layerpass.cli import main

    with pytest.raises(SystemExit) as info:
        main(["gpu-check", "--device", "cpu", "--sections", "kernel,nope"])
    assert info.value.code == 2
