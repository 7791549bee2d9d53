"""Run one measurement in a fresh interpreter with empty caches (a cold start).

Cold means: a new process (``VLLM_USE_LAYERNAME`` is read at import), an empty layerpass cache
dir (``LAYERPASS_CACHE_DIR``) and an empty ``TORCHINDUCTOR_CACHE_DIR``; both are removed after.
The child prints one line ``<prefix><json>``; that object is returned.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any


def run_cold(args: Sequence[str], *, use_layername: bool, prefix: str, timeout: float, what: str) -> tuple[dict[str, Any], float]:
    """Run ``python <args>`` cold; returns (the child's result object, wall seconds of the process)."""
    tmp = tempfile.mkdtemp(prefix="layerpass-bench-cold-")
    env = dict(os.environ, VLLM_USE_LAYERNAME="1" if use_layername else "0",
               LAYERPASS_CACHE_DIR=os.path.join(tmp, "layerpass"), TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"))
    env.pop("LAYERPASS_DEBUG_DUMP", None)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(prefix)]
    if proc.returncode != 0 or len(lines) != 1:
        raise RuntimeError(f"{what} (switch {'on' if use_layername else 'off'}) failed with exit code "
                           f"{proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(lines[0][len(prefix):]), wall
