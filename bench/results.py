"""The sweep's results document: what it records about the machine and the run, and writing it.

``results.json`` and ``results.md`` are rewritten after every row (each atomically: a temporary
file, then a rename), so an interrupted sweep keeps what it measured and a reader never sees half a
file.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from typing import Any

from .config import SweepConfig, config_record
from .schema import SCHEMA_VERSION
from .summary import markdown_table


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (``None`` where the platform has none)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine_info() -> dict[str, Any]:
    """The CPU, platform and versions that produced the figures."""
    import torch

    import layerpass

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "layerpass": layerpass.__version__, "cuda": torch.cuda.is_available(),
        "loadavg_start": loadavg(),
    }


def new_document(cfg: SweepConfig) -> dict[str, Any]:
    """A results document with no rows yet."""
    return {"schema_version": SCHEMA_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(), "config": config_record(cfg), "wall_s": 0.0, "rows": [], "ratios": []}


def write_results(doc: dict[str, Any], out_dir: str) -> str:
    """Write ``results.json`` and ``results.md`` into ``out_dir`` (atomically); returns the JSON's path."""
    from layerpass.backend.cache.private_files import atomic_write  # the one atomic writer

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    for name, text in (("results.json", json.dumps(doc, indent=1)), ("results.md", markdown_table(doc) + "\n")):
        atomic_write(os.path.join(out_dir, name), text.encode())
    return path
