"""Inductor's CPU vector-ISA probe answer, saved per machine in the layerpass cache dir.

The probe (``torch._inductor.cpu_vec_isa``) builds a test program per ISA the CPU flags allow and
loads each in a child Python process, in every new process: one to several seconds, more than a
warm start's whole load. Its answer depends only on the CPU's flags, the C++ compiler, the torch
build and the Python running it, so it is saved under a key of exactly those
(``<cache_dir>/isa-probe/<key>.json``). A process that finds an answer saying *every* allowed ISA
passed tells Inductor so with its own switch, ``cpp.vec_isa_ok = True`` (which means "assume the
allowed ISAs build and load"), scoped to layerpass's compiles and to priming Inductor's per-process
ISA list; Inductor then picks what its probe would have picked. Any other answer (an ISA that
failed), a changed machine, compiler or torch (another key), an unreadable file, a non-x86 CPU, or
a user who set ``cpp.vec_isa_ok`` themselves: Inductor probes as usual. Best-effort: a fault here
costs only the probe's time, never the compile.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import sys
from collections.abc import Iterator
from typing import Any

from ..cache.private_files import atomic_write

logger = logging.getLogger("layerpass")

FORMAT = 1


def candidate_isas() -> list[Any] | None:
    """The ISAs (Inductor's ``VecISA`` objects) its probe tests on this CPU, best first; None off x86."""
    from torch._inductor import cpu_vec_isa

    if platform.machine() not in ("x86_64", "AMD64") or sys.platform not in ("linux", "win32"):
        return None
    flags = cpu_vec_isa.x86_isa_checker()  # the same filter as Inductor's valid_vec_isa_list
    return [isa for isa in cpu_vec_isa.supported_vec_isa_list if all(flag in flags for flag in str(isa).split())]


def _candidates() -> list[str] | None:
    """The candidates as saved: each ISA with its compiler flags."""
    isas = candidate_isas()
    return None if isas is None else [f"{isa} [{isa.build_arch_flags()}]" for isa in isas]


def _key(candidates: list[str]) -> str:
    import torch
    from torch._inductor import cpu_vec_isa
    from torch._inductor.cpp_builder import get_compiler_version_info, get_cpp_compiler

    compiler = get_cpp_compiler()
    parts = {"format": FORMAT, "machine": platform.machine(), "cpu_flags": cpu_vec_isa.x86_isa_checker(),
             "candidates": candidates, "compiler": compiler, "compiler_version": get_compiler_version_info(compiler),
             "torch": torch.__version__, "torch_path": os.path.dirname(torch.__file__), "python": sys.version,
             "executable": sys.executable}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _path(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, "isa-probe", f"{key}.json")


def user_decided() -> bool:
    """The user set Inductor's ``cpp.vec_isa_ok`` (or ``TORCHINDUCTOR_VEC_ISA_OK``): leave it to them."""
    from torch._inductor import config

    return config.cpp.vec_isa_ok is not None


def saved_all_valid(cache_dir: str) -> bool:
    """Whether this machine's saved answer says every ISA the CPU allows passed the probe."""
    with contextlib.suppress(Exception):  # best-effort: any fault means "probe as usual"
        candidates = _candidates()
        if not candidates:
            return False
        with open(_path(cache_dir, _key(candidates))) as f:
            saved = json.load(f)
        return saved.get("candidates") == candidates and saved.get("valid") == candidates
    return False


def save_answer(cache_dir: str) -> None:
    """After Inductor's probe has run in this process: save which candidates passed (best-effort)."""
    try:
        from torch._inductor import cpu_vec_isa

        candidates = _candidates()
        if not candidates:
            return
        passed = {str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()}
        valid = [c for c in candidates if c.split(" [")[0] in passed]
        path = _path(cache_dir, _key(candidates))
        atomic_write(path, json.dumps({"candidates": candidates, "valid": valid}).encode())  # 0600, like the cache
    except Exception as e:  # noqa: BLE001 - the next process probes again
        logger.info("layerpass: could not save the CPU ISA probe's answer in %s (%s: %s)", cache_dir, type(e).__name__, e)


@contextlib.contextmanager
def assume_valid(active: bool) -> Iterator[None]:
    """Inductor's own switch for "every ISA the CPU allows builds and loads", for this block, if ``active``."""
    if not active:
        yield
        return
    from torch._inductor import config

    with config.patch({"cpp.vec_isa_ok": True}):
        yield
