"""Pass manager robustness: ``add_pass``, timing, a failing pass is
skipped (graph restored) with a warning naming it, ``uuid()`` tracks passes and config,
``LAYERPASS_DEBUG_DUMP`` writes readable before/after Python (and an unwritable dir is warned about
once, naming the variable). Unit cases run on small FX graphs (no Inductor); one integrated case
compiles llama-2 with a deliberately failing pass added to its backend.
"""

from __future__ import annotations

import glob
import logging
import os
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx

from layerpass.backend.config import CompilationConfig
from layerpass.envs import DEBUG_DUMP_ENV
from layerpass.passes.base import LayerpassPass
from layerpass.backend.pieces.pass_list import pass_manager_for
from layerpass.passes.pass_manager import PassManager
from tests.helpers import backend as bh

aten = torch.ops.aten


class RecordingPass(LayerpassPass):
    """Rewrites every ``aten.relu`` into ``aten.abs`` (so its effect is visible) and logs the call."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__()
        self.name = name  # type: ignore[misc]
        self.log = log

    def apply(self, graph: fx.Graph) -> int:
        self.log.append(self.name)
        hits = [n for n in graph.nodes if n.op == "call_function" and n.target is aten.relu.default]
        for n in hits:
            n.target = aten.abs.default
        return len(hits)


class ExplodingPass(LayerpassPass):
    """Changes the graph's maths, then raises: the pass manager must undo the change."""

    name = "exploding_test_pass"

    def apply(self, graph: fx.Graph) -> int:
        for n in graph.nodes:
            if n.op == "call_function" and n.target in (aten.mul.Tensor, aten.relu.default):
                n.target = aten.add.Tensor if n.target is aten.mul.Tensor else aten.neg.default
                break
        raise RuntimeError("deliberate failure from the test suite")


def toy_graph() -> fx.GraphModule:
    def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return aten.relu.default(aten.mul.Tensor(x, y)) - y

    return fx.symbolic_trace(f)


def call_targets(graph: fx.Graph) -> list:
    return [n.target for n in graph.nodes if n.op == "call_function"]


@settings(max_examples=10, deadline=None)
@given(layout=st.lists(st.sampled_from(["rec", "boom"]), min_size=1, max_size=5))
def test_failing_passes_are_skipped_and_the_rest_run_in_order(layout: list[str]) -> None:
    log: list[str] = []
    passes = [ExplodingPass() if k == "boom" else RecordingPass(f"rec{i}", log) for i, k in enumerate(layout)]
    pm = PassManager(passes)
    gm = toy_graph()
    x, y = torch.randn(3), torch.randn(3)
    expected = gm(x, y)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("layerpass").addHandler(handler)
    try:
        with pm.piece("submod_7") as run:
            pm(gm.graph)
    finally:
        logging.getLogger("layerpass").removeHandler(handler)
    assert log == [p.name for p in passes if isinstance(p, RecordingPass)]
    booms = layout.count("boom")
    assert len(run.failures) == len(records) == booms
    for msg in [r.getMessage() for r in records] + run.failures:
        assert "exploding_test_pass" in msg and "submod_7" in msg and "deliberate failure" in msg
    assert set(run.stats) == {p.name for p in passes}
    assert all(s["time_s"] >= 0 for s in run.stats.values())
    gm.graph.lint()
    gm.recompile()
    if "rec" in layout:  # the first recording pass turned relu into abs; nothing else changed
        torch.testing.assert_close(gm(x, y), torch.abs(x * y) - y)
        assert sum(int(run.stats[p.name]["matches"]) for p in passes if isinstance(p, RecordingPass)) == 1
    else:
        torch.testing.assert_close(gm(x, y), expected)
        assert aten.relu.default in call_targets(gm.graph) and aten.mul.Tensor in call_targets(gm.graph)


def test_pass_manager_uuid_covers_passes_and_config() -> None:
    log: list[str] = []
    a = PassManager([RecordingPass("a", log)], "cfg1")
    assert a.uuid() == PassManager([RecordingPass("a", log)], "cfg1").uuid()
    assert a.uuid() != PassManager([RecordingPass("a", log)], "cfg2").uuid()
    assert a.uuid() != PassManager([RecordingPass("a", log), ExplodingPass()], "cfg1").uuid()
    assert a.uuid() != PassManager([RecordingPass("b", log)], "cfg1").uuid()

    class Keyed(RecordingPass):
        def __init__(self, key: str) -> None:
            super().__init__("k", [])
            self.key = key

        def config_key(self) -> str:
            return self.key

    assert Keyed("x").uuid() != Keyed("y").uuid()


def test_add_pass_before_after_and_last() -> None:
    pm = pass_manager_for(CompilationConfig(fuse_moe=False))
    log: list[str] = []
    pm.add_pass(RecordingPass("first", log), before="noop_elimination")
    pm.add_pass(RecordingPass("oot_fusion", log), after="fuse_act_quant")
    pm.add_pass(RecordingPass("last", log))
    assert [p.name for p in pm.passes] == ["first", "noop_elimination", "fuse_attn_quant", "fuse_norm_quant",
                                           "fuse_act_quant", "oot_fusion", "lowering", "dead_code_elimination",
                                           "fix_functionalization", "last"]
    before = pm.uuid()
    pm.add_pass(ExplodingPass(), after="first")
    assert pm.uuid() != before and pm.passes[1].name == "exploding_test_pass"
    with pytest.raises(ValueError, match="no pass called 'fuse_moe'.*noop_elimination"):
        pm.add_pass(RecordingPass("x", log), before="fuse_moe")
    with pytest.raises(ValueError, match="not both"):
        pm.add_pass(RecordingPass("x", log), before="first", after="last")


def test_debug_dump_writes_readable_before_and_after(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(DEBUG_DUMP_ENV, str(tmp_path))
    log: list[str] = []
    pm = PassManager([RecordingPass("relu_to_abs", log), ExplodingPass()])
    with pm.piece("submod_3"):
        pm(toy_graph().graph)
    piece = tmp_path / "submod_3"
    files = sorted(p.name for p in piece.iterdir())
    assert files == ["00_relu_to_abs_after.py", "00_relu_to_abs_before.py", "01_exploding_test_pass_after.py",
                     "01_exploding_test_pass_before.py", "stats.json"]
    for name in files[:-1]:
        compile((piece / name).read_text(), name, "exec")  # readable, valid Python
    assert "aten.relu" in (piece / "00_relu_to_abs_before.py").read_text()
    after = (piece / "00_relu_to_abs_after.py").read_text()
    assert "aten.abs" in after and "aten.relu" not in after


def test_unwritable_debug_dump_warns_once_and_compiles_on(tmp_path, monkeypatch, caplog) -> None:
    """A ``LAYERPASS_DEBUG_DUMP`` that cannot be written (here a path that is a file; a read-only
    dir the same) must not fail the compile: one warning names the variable and the path, the
    passes still run, nothing is dumped."""
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file, not a dir")
    monkeypatch.setenv(DEBUG_DUMP_ENV, str(blocker))
    log: list[str] = []
    pm = PassManager([RecordingPass("relu_to_abs", log)])
    with caplog.at_level(logging.WARNING, logger="layerpass"):
        for piece in ("submod_1", "submod_2"):
            gm = toy_graph()
            with pm.piece(piece) as run:
                pm(gm.graph)
            assert run.failures == []
            assert aten.abs.default in call_targets(gm.graph)  # the pass ran
    assert log == ["relu_to_abs", "relu_to_abs"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert DEBUG_DUMP_ENV in warnings[0] and str(blocker) in warnings[0]
    assert blocker.read_text() == "a file, not a dir"


@pytest.mark.slow
def test_unwritable_debug_dump_does_not_fail_a_real_compile(tmp_path, monkeypatch, caplog) -> None:
    """The same through ``layerpass.compile`` (before: an ``InductorError`` that never named the variable)."""
    blocker = tmp_path / "dump_file"
    blocker.write_text("")
    monkeypatch.setenv(DEBUG_DUMP_ENV, str(blocker))
    # a fresh Inductor cache: a piece served from the session's would never run the passes (nor dump)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    with caplog.at_level(logging.WARNING, logger="layerpass"):
        c = bh.compile_zoo("llama", 2, disable_cache=True)
    bh.assert_matches(c.out, c.ref, "llama-2 compiled with an unwritable dump dir")
    named = [r.getMessage() for r in caplog.records if DEBUG_DUMP_ENV in r.getMessage()]
    assert len(named) == 1 and str(blocker) in named[0]


# ---------------------------------------------------------------- integrated: llama-2 with a failing pass
@pytest.fixture(scope="module")
def exploded(tmp_path_factory):
    dump = tmp_path_factory.mktemp("dump")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("layerpass")
    logger.addHandler(handler)
    old = os.environ.get(DEBUG_DUMP_ENV)
    os.environ[DEBUG_DUMP_ENV] = str(dump)
    try:
        c = bh.compile_zoo("llama", 2, setup=lambda m: m.backend.pass_manager.add_pass(ExplodingPass(), before="noop_elimination"))
    finally:
        logger.removeHandler(handler)
        if old is None:
            os.environ.pop(DEBUG_DUMP_ENV, None)
        else:
            os.environ[DEBUG_DUMP_ENV] = old
    return c, [r.getMessage() for r in records], dump


def test_failing_pass_leaves_the_compile_working(exploded) -> None:
    c, warnings, _ = exploded
    bh.assert_matches(c.out, c.ref, "llama-2 compiled with a failing pass")
    r = c.report
    assert r.num_compiled == r.num_unique_pieces > 0
    assert len(r.pass_failures) == r.num_compiled, r.pass_failures
    assert all("exploding_test_pass" in f for f in r.pass_failures)
    named = [w for w in warnings if "exploding_test_pass" in w]
    assert len(named) == r.num_compiled, warnings
    # the passes after it still ran on every piece
    assert "fix_functionalization" in r.pass_time_s and r.matches.get("exploding_test_pass", 0) == 0


def test_failing_pass_debug_dump_per_compiled_piece(exploded) -> None:
    c, _, dump = exploded
    compiled = [p.name for p in c.report.pieces if p.source == "compiled"]
    names = [p.name for p in c.compiled.backend.pass_manager.passes]
    assert names[0] == "exploding_test_pass"
    for piece in compiled:
        files = {os.path.basename(f) for f in glob.glob(os.path.join(dump, piece, "*.py"))}
        want = {f"{i:02d}_{n}_{w}.py" for i, n in enumerate(names) for w in ("before", "after")}
        assert files == want, (piece, sorted(files ^ want))
        src = open(os.path.join(dump, piece, f"{len(names) - 1:02d}_{names[-1]}_after.py")).read()
        assert re.search(r"def forward\(", src)
