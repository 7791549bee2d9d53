"""layerpass calls no deprecated torch API, on whichever supported torch runs the suite.

torch announces deprecations two ways: ``warnings.warn(DeprecationWarning / FutureWarning)`` and,
for the opaque-type registration on 2.14, a ``logging`` warning ("... is deprecated, use ...").
pyproject's ``filterwarnings`` hides the first kind from the other tests, so this one runs a fresh
interpreter that records both while it imports layerpass and compiles and runs the quick start
(2 layers, no cache). A record counts when a frame of layerpass's source is on the stack that
emitted it and what layerpass called there was not an import, so torch's own deprecations (2.11's
``torch.jit.script_method`` while importing Inductor, a test helper) do not.
"""

from __future__ import annotations

from tests.helpers import backend as bh

BODY = r"""
import logging, os, traceback, warnings
import layerpass.torch_compat
SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(layerpass.torch_compat.__file__)))
found = []

def ours(f):
    return (f.filename.startswith(SOURCE + os.sep) and "site-packages" not in f.filename
            and os.sep + "tests" + os.sep not in f.filename[len(SOURCE):])

def layerpass_frames():
    # layerpass's frames on the stack, innermost last; none if what layerpass called was an
    # import (torch deprecating something while importing its own modules is torch's affair)
    stack = traceback.extract_stack()
    mine = [i for i, f in enumerate(stack) if ours(f)]
    if not mine or any(f.filename.startswith("<frozen importlib") for f in stack[mine[-1] + 1:]):
        return []
    return [f"{stack[i].filename}:{stack[i].lineno}" for i in mine]

class Deprecations(logging.Handler):
    def emit(self, record):
        frames = layerpass_frames()
        if "deprecat" in record.getMessage().lower() and frames:
            found.append({"how": f"logging {record.name}", "message": record.getMessage(), "from": frames[-1]})

def show(message, category, filename, lineno, file=None, line=None):
    frames = layerpass_frames()
    if issubclass(category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)) and frames:
        found.append({"how": category.__name__, "message": str(message), "from": frames[-1]})

handler = Deprecations(logging.WARNING)
for name in ("", "torch"):  # torch's loggers do not propagate to the root
    logging.getLogger(name).addHandler(handler)
warnings.simplefilter("always")
warnings.showwarning = show

import layerpass
from layerpass.models import build_model, make_step
model = build_model("llama-fp8", num_layers=2)
step = make_step(model, num_decodes=2, prefill_lens=[5, 3])
compiled = layerpass.compile(model, layerpass.CompilationConfig(disable_cache=True))
with torch.no_grad():
    step.run(compiled)
emit({"torch": torch.__version__, "found": found, "trace": layerpass.last_compile_report().trace})
"""


def test_importing_and_compiling_emits_no_deprecation_from_layerpass() -> None:
    out = bh.run_python(BODY, timeout=600, what="deprecation check").result
    assert out["trace"] == "regions", out
    assert out["found"] == [], f"torch {out['torch']}: layerpass calls deprecated API: {out['found']}"
