"""``bench/kernels.py``: the no-CUDA exit, and its cases run end to end (tiny, interpreter)."""

from __future__ import annotations

# First: sets TRITON_INTERPRET before triton is imported, and skips when triton is missing.
from tests.helpers.triton import load_interpreted

import pytest  # noqa: E402
import torch  # noqa: E402

from layerpass.bench import kernels  # noqa: E402

load_interpreted("attention")  # skips this module if the kernels could not be interpreted


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed on machines without CUDA")
def test_without_cuda_it_says_so_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert kernels.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_cases_run_and_agree_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert kernels.main(["--device", "cpu", "--tiny", "--dtype", "fp32", "--cases", "rms_norm+fp8,attention_prefill+fp8,moe_experts"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == {"rms_norm+fp8", "attention_prefill+fp8", "moe_experts"}
    assert float(rows["moe_experts"][-1]) < 1e-4  # max |torch - triton| in fp32


def test_unknown_case_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert kernels.main(["--device", "cpu", "--tiny", "--cases", "nope"]) == 2
    assert "unknown case" in capsys.readouterr().out
