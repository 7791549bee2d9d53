"""Shared helpers for the compile-backend tests (``tests/backend`` and every test that compiles).

Why these exist:
- Every Inductor compile costs seconds on a small shared CPU box, so compiled zoo models are
  memoised per process (``compiled_zoo``) and all tests share ONE Inductor cache directory per
  pytest session (``session_inductor_dir``; ``conftest.py`` sets it up, shared by xdist workers
  and by the tests' subprocesses). Identical pieces compiled in several tests (or processes)
  then hit Inductor's own cache. The layerpass cache is never shared: every compile gets a
  fresh ``cache_dir`` unless a test says otherwise.
- Some behaviour is only observable in a fresh process (warm start, ``VLLM_USE_LAYERNAME=0``
  is read at import, the ``torch_dynamo_backends`` entry point). ``run_python`` runs a script
  in a subprocess with that session's Inductor cache and returns the JSON it ``emit``s.

Importing this module changes no global state. Nothing here imports ``layerpass`` at module
level: the entry-point test runs a subprocess that must not import it before
``torch.compile(..., backend="layerpass")``.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pytest
import torch
from torch import fx, nn

# the repository root: subprocesses import the helpers as ``tests.helpers``
TESTS_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULT_PREFIX = "LAYERPASS-TEST-RESULT:"
SUMMARY_RE = re.compile(r"layerpass: (\d+) pieces \((\d+) unique, (\d+) compiled, (\d+) from cache\) in (\d+\.\d\d) s")
# Compiled vs eager float32: Inductor may reorder reductions, nothing else may differ.
ATOL = RTOL = 1e-4
STANDARD_STEP = {"num_decodes": 2, "prefill_lens": [3, 5]}  # 12 tokens, decode-first
# Tests that count regions (one per distinct layer): torch 2.11 gives every layer its own
# (``torch_compat.region_per_layer`` says why, and the report's notes too).
def shared_regions(test: Callable[..., Any]) -> Callable[..., Any]:
    """Skip a test that counts regions where torch gives every layer its own (imported here, not at
    the top: importing the helpers must not import layerpass)."""
    from layerpass.torch_compat import region_per_layer

    why = region_per_layer()
    return pytest.mark.skipif(why is not None, reason=str(why))(test)


SESSION_ENV = "LAYERPASS_TEST_INDUCTOR_DIR"  # inherited by subprocesses: they reuse the session's dir
_created: list[str] = []


def _cleanup() -> None:
    for path in _created:
        shutil.rmtree(path, ignore_errors=True)


def _mkdtemp(prefix: str) -> str:
    if not _created:
        atexit.register(_cleanup)
    path = tempfile.mkdtemp(prefix=prefix)
    _created.append(path)
    return path


def session_inductor_dir() -> tuple[str, bool]:
    """The Inductor cache dir of this pytest session and whether this process owns it (removes it
    at the end): inherited from a parent test process, shared by the xdist workers of one run
    (same testrun uid; no worker may delete it), or a fresh one. ``conftest.py`` points
    ``TORCHINDUCTOR_CACHE_DIR`` (and ``SESSION_ENV``, for subprocesses) at it for the session."""
    inherited = os.environ.get(SESSION_ENV)
    if inherited:
        return inherited, False
    uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if uid:
        path = os.path.join(tempfile.gettempdir(), f"layerpass-test-inductor-{uid}")
        os.makedirs(path, exist_ok=True)
        return path, False
    return tempfile.mkdtemp(prefix="layerpass-test-inductor-"), True


def fresh_cache_dir(tag: str = "lp") -> str:
    """An empty layerpass cache dir, removed when this process exits; tests never share one."""
    return _mkdtemp(f"layerpass-test-{tag}-")


def assert_matches(out: torch.Tensor, ref: torch.Tensor, what: str = "compiled output") -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype, f"{what}: {out.shape}/{out.dtype} vs eager {ref.shape}/{ref.dtype}"
    assert torch.isfinite(ref).all(), "eager reference has non-finite values: the test model is broken"
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what} differs from eager: {m}")


def report_dict(report: Any) -> dict[str, Any]:
    """The JSON-safe part of a ``CompileReport`` (pieces reduced to name/kind/source/layer/key)."""
    d = {k: v for k, v in asdict(report).items() if k not in ("pieces",)}
    d["pieces"] = [{"name": p.name, "kind": p.kind, "source": p.source, "layer": p.layer, "key": p.key,
                    "constants": [str(c[2]) for c in p.constants]} for p in report.pieces]
    return json.loads(json.dumps(d, default=str))


@dataclass
class Compiled:
    """A zoo model, its compiled form, the standard step, eager and compiled outputs, the report;
    the layerpass cache dir it used (None: cache disabled) and, from ``fusion.compile_recorded``,
    each compiled piece's final graph."""

    model: Any
    compiled: Any
    step: Any
    ref: torch.Tensor
    out: torch.Tensor
    report: Any
    cache_dir: str | None = None
    graphs: list[fx.Graph] = field(default_factory=list)


def compile_zoo(name: str, num_layers: int, *, cache_dir: str | None = None, step: dict[str, Any] | None = None,
                setup: Callable[[Any], None] | None = None, **config: Any) -> Compiled:
    """Build zoo model ``name``, run the step eagerly, compile with ``layerpass.compile`` and run it.

    ``setup(compiled_model)`` runs before the first call (the compile is lazy), e.g. to
    install an extra pass with ``compiled_model.backend.pass_manager.add_pass``."""
    import layerpass
    from layerpass.models import build_model, make_step
    from layerpass.backend.config import CompilationConfig
    from layerpass.backend.report.compile_report import compile_reports, num_compile_reports

    cache_dir = cache_dir or fresh_cache_dir(f"{name}{num_layers}")
    model = build_model(name, num_layers=num_layers)
    s = make_step(model, **(step or STANDARD_STEP))
    with torch.no_grad():
        ref = s.run(model)
        compiled = layerpass.compile(model, CompilationConfig(cache_dir=cache_dir, **config))
        if setup is not None:
            setup(compiled)
        before = num_compile_reports()
        out = s.run(compiled)
    reports = compile_reports(since=before)
    assert reports, "layerpass.compile ran but the backend never published a report"
    return Compiled(model, compiled, s, ref, out, reports[-1], cache_dir)


@functools.cache
def compiled_zoo(name: str, num_layers: int, split: str = "layers") -> Compiled:
    """``compile_zoo`` memoised per process: tests in one worker share these compiles."""
    return compile_zoo(name, num_layers, split=split)


# ---------------------------------------------------------------------------- a toy model
class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.relu.default(self.lin(x)) + x  # an OpOverload, so split_by_ops can cut at it


class Stack(nn.Module):
    """Plain torch (no layerpass op): an input projection, a ``ModuleList`` of blocks, a head.

    Cheap to compile, and usable where ``layerpass`` must not be imported yet."""

    def __init__(self, layers: int, width: int = 8, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.inp = nn.Linear(width, width)
            self.layers = nn.ModuleList(Block(width) for _ in range(layers))
            self.out = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x) * 2
        for layer in self.layers:
            x = layer(x)
        return self.out(x).sum(-1)


class Chain(nn.Module):
    """The given layers in one ``ModuleList``, called in order: the test picks which layers repeat."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class HeadsLayer(nn.Module):
    """A layer holding a ``ModuleList`` of 4 heads: a list inside the decoder layers' list."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(8, 2) for _ in range(4))
        self.out = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([h(x) for h in self.heads], -1)) + x


class HeadsModel(nn.Module):
    """An input projection and 3 ``HeadsLayer``s: more heads per layer (4) than layers (3)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.inp = nn.Linear(8, 8)
            self.layers = nn.ModuleList(HeadsLayer() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return x


# ---------------------------------------------------------------------------- graphs without Inductor
def dynamo_graph(model: nn.Module, *args: torch.Tensor) -> tuple[fx.GraphModule, list[Any]]:
    """``model(*args)``'s Dynamo graph and example inputs, captured by a backend that compiles
    nothing; Dynamo is reset first, so the model is traced afresh."""
    captured: list[tuple[fx.GraphModule, list[Any]]] = []

    def capture(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        captured.append((gm, list(example_inputs)))
        return gm.forward

    torch.compiler.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture, dynamic=False)(*args)
    assert len(captured) == 1, "the test model must trace to one graph"
    return captured[0]


def layer_piece_keys(split: Any, inputs: list[Any]) -> dict[int, str]:
    """Decoder-layer index -> piece key of each layer piece of ``split`` (a ``SplitResult``), hashed
    on the arguments each piece receives when the split graph runs on ``inputs``."""
    from layerpass.backend.pieces.piece_hash import piece_signature

    keys: dict[int, str] = {}

    class Hash(fx.Interpreter):
        def call_module(self, target: str, args: Any, kwargs: Any) -> Any:
            layer = split.piece_layers.get(target)
            if layer is not None:
                keys[layer] = piece_signature(getattr(split.graph_module, target), args).key
            return super().call_module(target, args, kwargs)

    with torch.no_grad():
        Hash(split.graph_module).run(*inputs)
    return keys


# ---------------------------------------------------------------------------- subprocesses
def subprocess_env(**extra: str | None) -> dict[str, str]:
    """This environment (in a test session: with its Inductor cache dir); ``None`` values unset a variable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([TESTS_DIR, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    env.pop("PYTEST_XDIST_WORKER", None)
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


SCRIPT_PRELUDE = """\
import json, sys
import torch
torch.set_num_threads(1)

def emit(obj):
    print({prefix!r} + json.dumps(obj, default=str), flush=True)
"""


def script(body: str) -> str:
    return SCRIPT_PRELUDE.format(prefix=RESULT_PREFIX) + textwrap.dedent(body)


@dataclass
class ProcResult:
    result: dict[str, Any]
    stdout: str
    stderr: str


def parse_result(proc_stdout: str, proc_stderr: str, returncode: int, what: str) -> ProcResult:
    if returncode != 0:
        raise AssertionError(f"{what} exited with {returncode}; stderr tail:\n{proc_stderr[-4000:]}")
    lines = [ln for ln in proc_stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if len(lines) != 1:
        raise AssertionError(f"{what} emitted {len(lines)} results; stdout:\n{proc_stdout[-2000:]}\nstderr:\n{proc_stderr[-2000:]}")
    return ProcResult(json.loads(lines[0][len(RESULT_PREFIX):]), proc_stdout, proc_stderr)


def run_python(body: str, *, env: dict[str, str] | None = None, timeout: float = 300, what: str = "subprocess") -> ProcResult:
    """Run ``script(body)`` in a fresh interpreter; it must ``emit`` exactly one result."""
    proc = subprocess.run([sys.executable, "-c", script(body)], env=env or subprocess_env(), capture_output=True,
                          text=True, timeout=timeout, cwd=TESTS_DIR)
    return parse_result(proc.stdout, proc.stderr, proc.returncode, what)


def start_python(body: str, *, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Like ``run_python`` but returns the running process (for concurrent runs)."""
    return subprocess.Popen([sys.executable, "-c", script(body)], env=env or subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=TESTS_DIR)


def finish_python(proc: subprocess.Popen, *, timeout: float = 300, what: str = "subprocess") -> ProcResult:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"{what} timed out after {timeout} s; stderr tail:\n{err[-2000:]}") from None
    return parse_result(out, err, proc.returncode, what)


# A subprocess body that compiles a zoo model and emits the report and outputs (as lists).
COMPILE_ZOO_BODY = """\
from tests.helpers import backend as bh
from layerpass.backend.report.compile_report import num_compile_reports
import layerpass
c = bh.compile_zoo({name!r}, {layers}, cache_dir={cache_dir!r}, **{config!r})
emit({{"report": bh.report_dict(c.report), "reports": num_compile_reports(), "out": c.out.tolist(),
       "ref": c.ref.tolist(), "use_layername": layerpass.USE_LAYERNAME, "recompiles": c.compiled.recompiles}})
"""


def compile_zoo_body(name: str, layers: int, cache_dir: str, **config: Any) -> str:
    return COMPILE_ZOO_BODY.format(name=name, layers=layers, cache_dir=cache_dir, config=config)
