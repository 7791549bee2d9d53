"""Inductor's CPU vector-ISA probe, started early in a thread so it overlaps with other start-up work.

``pick_vec_isa`` (small test builds, each loaded in a child process) costs about a second once per
process, and the first compiled or loaded CPU piece waits for it. ``layerpass.compile`` starts it
in a thread; the regions wait for it (``wait_for_cpu_isa_probe``) just before Inductor needs the
answer, so it is never run twice and its child processes overlap with imports, the model key and
reading the saved programs. Its result is Inductor's own (cached per process); a failed probe here
only means Inductor probes again itself.
"""

from __future__ import annotations

import contextlib
import threading

from torch import nn

_isa_probe: list[threading.Thread] = []


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
    if not _isa_probe:
        return
    with contextlib.suppress(ImportError):
        import_inductor_modules()
    while _isa_probe:
        _isa_probe.pop().join()


def probe_cpu_isa_in_background(model: nn.Module) -> None:
    """Start Inductor's CPU vector-ISA probe now, in a thread, for a model with CPU weights.

    The probe (``pick_vec_isa``: small test builds, each loaded in a child process) costs about a
    second once per process, and the first compiled or loaded CPU piece waits for it. Started here it
    overlaps with the rest of the first call (imports, model key, loading programs) instead of adding
    to it. Its result is cached by Inductor; a failure here only means the piece probes again."""
    if not any(p.device.type == "cpu" for p in model.parameters()):
        return

    def probe() -> None:
        with contextlib.suppress(Exception):
            from torch._inductor.cpu_vec_isa import pick_vec_isa

            pick_vec_isa()

    from torch._inductor import cpu_vec_isa

    if cpu_vec_isa.valid_vec_isa_list.cache_info().currsize:  # this process has probed already
        return
    thread = threading.Thread(target=probe, name="layerpass-isa-probe", daemon=True)
    thread.start()
    _isa_probe.append(thread)
