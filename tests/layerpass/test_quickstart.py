"""The README's quick start (``examples/quickstart.py``) runs and says what the README says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import backend as bh

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"


@pytest.mark.slow
def test_quickstart_runs_as_documented() -> None:
    proc = subprocess.run([sys.executable, str(EXAMPLE)], env=bh.subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"8 pieces \(1 unique, 1 compiled, 0 from cache\)", out), out
    assert "regions 1" in out, out
    err = float(re.search(r"max \|eager - compiled\| = (\S+)", out).group(1))
    assert err < 1e-3, out
