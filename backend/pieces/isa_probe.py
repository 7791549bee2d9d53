"""Inductor's CPU vector-ISA probe, started early in a thread so it overlaps with other start-up work.

``pick_vec_isa`` (small test builds, each loaded in a child process) costs one to several seconds
once per process (the builds are skipped while Inductor's cache dir keeps them; the child processes
are not), and the first compiled or loaded CPU piece waits for it. ``layerpass.compile`` starts it
in a thread; the backend waits for it (``wait_for_cpu_isa_probe``) only just before Inductor needs
the answer, a piece's compile (after Dynamo's trace) or load, so it is never run twice and its child
processes overlap with Dynamo, the model key and reading the saved programs. Its result is
Inductor's own (cached per process); a failed probe here only means Inductor probes again itself.
Both the probe and any wait for it are spans of the report's timeline.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

from torch import nn

from .isa_answer import assume_valid, save_answer, saved_all_valid, user_decided
from ..report.timeline import add_span, span

_isa_probe: list[threading.Thread] = []
_probe_span: list[Any] = []  # (what, start, end) of this process's probe, perf_counter values
_assumed: list[bool] = []  # [True] once a saved answer said every ISA the CPU allows is valid


def import_inductor_modules() -> None:
    """Import what compiling or loading an Inductor piece imports (about a second, once per process).

    The one list of them: the probe overlaps these imports with its child processes, and the
    benchmark (``bench/measure.py``) imports the same ones before its clock in every mode, so which
    mode happens to import them lazily inside its first call does not decide its figure."""
    import torch._inductor.codecache  # noqa: F401
    import torch._inductor.compile_fx  # noqa: F401
    import torch._inductor.standalone_compile  # noqa: F401


def wait_for_cpu_isa_probe() -> None:
    """Let a started probe finish before Inductor needs its answer (so it is not run twice).

    While it runs, import what loading or compiling a piece imports anyway: that work then overlaps
    with the probe's child processes instead of following them."""
    if _isa_probe:
        with span("isa probe wait"):
            with contextlib.suppress(ImportError):
                import_inductor_modules()
            while _isa_probe:
                _isa_probe.pop().join()
    if _probe_span:  # on the timeline of the call that first needed it
        add_span(*_probe_span)
        _probe_span.clear()


def inductor_isa_config() -> contextlib.AbstractContextManager[None]:
    """Around a piece's Inductor compile: what this process knows of the ISA probe's answer, in
    Inductor's own switch (``isa_answer.assume_valid``), so its codegen does not probe again."""
    return assume_valid(bool(_assumed))


PROBE_SPAN = "Inductor's CPU ISA probe, in the background"


def probe_cpu_isa_in_background(model: nn.Module, cache_dir: str | None) -> None:
    """Start Inductor's CPU vector-ISA probe now, in a thread, for a model with CPU weights; if
    ``cache_dir`` holds this machine's answer and it says every ISA passed, the thread takes that
    instead (``isa_answer``: no test builds and child processes but the one check an ISA class makes
    of itself). A probe run here saves its answer there. Measured on a loaded 2-core machine, and so
    left out: checking the ISAs in parallel (their compilers took the cores from Dynamo's trace, 4x
    slower) and Inductor's per-process source hashes beside it (they took the GIL from it).

    The probe (``pick_vec_isa``: small test builds, each loaded in a child process) costs one to
    several seconds once per process, and the first compiled or loaded CPU piece waits for it.
    Started here it overlaps with the rest of the first call (Dynamo, the model key, loading
    programs) instead of adding to it. Its result is cached by Inductor; a failure here only means
    the piece probes again. (The saved answer's switch, set in this thread, is Inductor's global
    config for a moment: the main thread reads it only in Inductor's work, which waits for this
    thread first.)"""
    if not any(p.device.type == "cpu" for p in model.parameters()):
        return

    from torch._inductor import cpu_vec_isa

    if cpu_vec_isa.valid_vec_isa_list.cache_info().currsize:  # this process has probed already
        return
    persist = cache_dir is not None and not user_decided()
    saved = persist and saved_all_valid(cache_dir)
    start = time.perf_counter()

    def probe() -> None:
        with contextlib.suppress(Exception):
            if saved:
                with assume_valid(True):
                    cpu_vec_isa.pick_vec_isa()  # fills Inductor's per-process ISA list without probing
                _assumed[:] = [True]
            else:
                cpu_vec_isa.pick_vec_isa()
                if persist:
                    save_answer(cache_dir)
        what = "this machine's saved answer" if saved else "probe"
        _probe_span[:] = [f"{PROBE_SPAN} ({what})", start, time.perf_counter()]

    thread = threading.Thread(target=probe, name="layerpass-isa-probe", daemon=True)
    thread.start()
    _isa_probe.append(thread)
