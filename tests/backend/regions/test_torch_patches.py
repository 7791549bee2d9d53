"""``backend/regions/torch_patches.py``: each torch patch is installed while a block is open, in any
thread, and torch's own is back when the last block closes; each thread records its own traced code.

The slow case is the acceptance of the traced-code hook: two models make their first calls in
two threads at once, then a helper of each is edited, and a new process must fall back for both,
naming each model's own edit (with the hook swapped without a lock, the thread that finished
first put torch's ``add_code`` back while the other was tracing, so one region recorded the
other's code or none, and its staleness check missed its own edit).
"""

from __future__ import annotations

import textwrap
import threading
from pathlib import Path

import pytest

from layerpass.backend.regions import guard_pickling, torch_patches
from layerpass.backend.regions.torch_patches import GUARD_PICKLER, TRACED_CODE, recording_traced_code, saveable_guards
from tests.helpers import backend as bh


# ---------------------------------------------------------------- the guard-state pickler
def test_pickler_restored_after_the_block() -> None:
    cls = guard_pickling.pickler_class()
    original = cls.__dict__["reducer_override"]
    with saveable_guards():
        assert cls.reducer_override is not original
        with saveable_guards():  # nested
            pass
        assert cls.reducer_override is not original
    assert cls.__dict__["reducer_override"] is original
    with pytest.raises(RuntimeError), saveable_guards():
        raise RuntimeError("inside")
    assert cls.__dict__["reducer_override"] is original and GUARD_PICKLER.depth == 0


def test_overlapping_pickler_blocks_in_threads() -> None:
    cls = guard_pickling.pickler_class()
    original = cls.__dict__["reducer_override"]
    entered, release = threading.Event(), threading.Event()

    def other() -> None:
        with saveable_guards():
            entered.set()
            release.wait(10)

    t = threading.Thread(target=other)
    t.start()
    assert entered.wait(10)
    with saveable_guards():
        pass
    assert cls.reducer_override is not original  # the other thread's block is still open
    release.set()
    t.join(10)
    assert cls.__dict__["reducer_override"] is original


def test_no_op_where_torch_lacks_the_patched_class(monkeypatch: pytest.MonkeyPatch) -> None:
    cls = guard_pickling.pickler_class()
    original = cls.__dict__["reducer_override"]
    monkeypatch.setattr(GUARD_PICKLER, "target", lambda: None)
    with saveable_guards():
        assert cls.__dict__["reducer_override"] is original
    with GUARD_PICKLER.active() as installed:
        assert not installed


# ---------------------------------------------------------------- the traced-code hook
def helper_one(x):  # code objects with a module and source, as Dynamo hands them over
    return x + 1


def helper_two(x):
    return x * 2


def _add(code) -> None:
    """What ``aot_compile`` does with each code object it inlined."""
    from torch._dynamo.package import SourceInfo

    SourceInfo(inlined_sources=set()).add_code(code)


def test_each_thread_records_its_own_code_and_keeps_the_hook_until_it_leaves() -> None:
    """Thread B opens a recording after A and closes it first, and the other way round: each
    recording holds exactly the code added in its own thread while it was open."""
    from torch._dynamo.package import SourceInfo

    original = SourceInfo.__dict__["add_code"]
    for b_leaves_first in (True, False):
        opened, added, b_done, a_done = (threading.Event() for _ in range(4))
        got: dict[str, list] = {}

        def b() -> None:
            with recording_traced_code() as codes:
                opened.set()
                added.wait(10)
                _add(helper_two.__code__)
                if not b_leaves_first:
                    a_done.wait(10)
            got["b"] = list(codes)
            b_done.set()

        with recording_traced_code() as codes_a:
            t = threading.Thread(target=b)
            t.start()
            assert opened.wait(10)
            _add(helper_one.__code__)
            added.set()
            if b_leaves_first:
                assert b_done.wait(10)
                assert SourceInfo.add_code is not original  # A's block is still open
                _add(helper_one.__code__)
        a_done.set()
        t.join(10)
        assert codes_a == [helper_one.__code__] * (2 if b_leaves_first else 1), codes_a
        assert got["b"] == [helper_two.__code__], got
        assert SourceInfo.__dict__["add_code"] is original and TRACED_CODE.depth == 0


def test_nested_recordings_each_get_their_span() -> None:
    with recording_traced_code() as outer:
        _add(helper_one.__code__)
        with recording_traced_code() as inner:
            _add(helper_two.__code__)
        _add(helper_one.__code__)
    assert outer == [helper_one.__code__, helper_two.__code__, helper_one.__code__]
    assert inner == [helper_two.__code__]
    assert not getattr(torch_patches._recordings, "lists", [])


# ---------------------------------------------------------------- acceptance: two threads, then an edit
THREAD_MODEL = '''
import torch
from torch import nn


def helper(x):
    return x * {factor}


class Block{tag}(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x):
        return helper(torch.relu(self.lin(x))) + x


class Net{tag}(nn.Module):
    def __init__(self, layers, width=8):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Block{tag}(width) for _ in range(layers))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)
'''

FIRST_CALLS_IN_THREADS = """
import sys, threading
sys.path.insert(0, {model_dir!r})
import torch, layerpass
from layerpass.backend.config import CompilationConfig
import thread_model_a, thread_model_b
models = [thread_model_a.NetA(3).eval(), thread_model_b.NetB(3).eval()]
compiled = [layerpass.compile(m, CompilationConfig(cache_dir={cache_dir!r})) for m in models]
start, errs, failures = threading.Barrier(2), {{}}, []

def first_call(i):
    try:
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            ref = models[i](x)
            start.wait(60)
            errs[i] = (compiled[i](x) - ref).abs().max().item()
    except BaseException as e:
        failures.append(repr(e))

threads = [threading.Thread(target=first_call, args=(i,)) for i in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
emit({{"errs": errs, "failures": failures, "status": [c.regions.store.status for c in compiled]}})
"""

NEW_PROCESS = """
import logging, sys
sys.path.insert(0, {model_dir!r})
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
import torch, layerpass
from layerpass.backend.config import CompilationConfig
import thread_model_a, thread_model_b
out = {{}}
for name, model in (("a", thread_model_a.NetA(3).eval()), ("b", thread_model_b.NetB(3).eval())):
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        got = layerpass.compile(model, CompilationConfig(cache_dir={cache_dir!r}))(x)
    r = layerpass.last_compile_report()
    out[name] = {{"err": (got - ref).abs().max().item(), "warm_start": r.warm_start, "trace": r.trace}}
emit(out)
"""


def _write_models(model_dir: Path, factor_a: float, factor_b: float) -> None:
    (model_dir / "thread_model_a.py").write_text(THREAD_MODEL.format(factor=factor_a, tag="A"))
    (model_dir / "thread_model_b.py").write_text(THREAD_MODEL.format(factor=factor_b, tag="B"))


@pytest.mark.slow
def test_first_calls_in_two_threads_then_edits_fall_back_naming_each_edit(tmp_path: Path) -> None:
    _write_models(tmp_path, 3.0, 5.0)
    cache = bh.fresh_cache_dir("threads")
    first = bh.run_python(textwrap.dedent(FIRST_CALLS_IN_THREADS.format(model_dir=str(tmp_path), cache_dir=cache)),
                          what="first calls in two threads").result
    assert not first["failures"] and all(e < 1e-5 for e in first["errs"].values()), first
    assert all(s.startswith("fallback: no saved program") for s in first["status"]), first  # both traced and saved
    _write_models(tmp_path, 4.0, 6.0)  # an edit of each model's helper (not of its classes: same model key)
    again = bh.run_python(textwrap.dedent(NEW_PROCESS.format(model_dir=str(tmp_path), cache_dir=cache)),
                          what="new process after the edits").result
    for name in ("a", "b"):
        r = again[name]
        assert r["trace"] == "regions" and r["err"] < 1e-5, (name, r)  # equals eager of the edited code
        assert r["warm_start"].startswith("fallback"), (name, r)
        assert f"thread_model_{name}.helper (" in r["warm_start"] and "changed since the program was traced" in \
            r["warm_start"], (name, r)
