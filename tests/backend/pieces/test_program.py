"""``backend/pieces/program.py``: what the backend returns, and how a saved one comes back.

- ``PieceRunner``: a piece's calling convention (one output unwrapped, lists as tuples) and its
  static-size variants, compiled once at a listed token count and used only there.
- ``PiecewiseProgram`` saved and loaded: Dynamo's graph (still computing what it computed, each
  value's sizes kept for re-splitting), the pieces' calls and the state come back; a loaded
  program runs, and has a report, only once its pieces are installed; another format is refused;
  ``loading_programs`` hands the caller each program loaded in its block.
- End to end: a ``split="ops"`` program (its pieces take the token count) warm-starts and runs.
"""

from __future__ import annotations

import pickle
from typing import Any

import pytest
import torch
from torch import fx

from layerpass.backend.pieces.program import FORMAT_VERSION, PieceCall, PiecewiseProgram, PieceRunner, loading_programs
from layerpass.backend.report.compile_report import CompileReport
from tests.helpers import backend as bh


# ---------------------------------------------------------------- PieceRunner
def test_a_single_output_is_unwrapped_and_lists_become_tuples() -> None:
    x = torch.randn(3)
    assert PieceRunner(lambda t: [t * 2], single_output=True)(x).equal(x * 2)
    pair = PieceRunner(lambda t: [t, t + 1], single_output=False)(x)
    assert isinstance(pair, tuple) and pair[0] is x and pair[1].equal(x + 1)
    one = PieceRunner(lambda t: (t,), single_output=False)(x)
    assert isinstance(one, tuple) and len(one) == 1 and one[0] is x


def test_static_variants_are_compiled_once_and_used_at_their_sizes_only() -> None:
    compiled: list[int] = []

    def compile_static(args: list[Any]) -> Any:
        n = int(args[0].shape[0])
        compiled.append(n)
        return lambda t: [t * 0 + n]  # a variant answers with its token count

    runner = PieceRunner(lambda t: [t], single_output=True, token_arg=0, compile_static=compile_static,
                         compile_sizes=(4,))
    for tokens in (4, 3, 4, 5, 4):
        out = runner(torch.ones(tokens))
        assert out.equal(torch.full((tokens,), 4.0) if tokens == 4 else torch.ones(tokens)), tokens
    assert compiled == [4]


# ---------------------------------------------------------------- saving and loading
def saved(model: torch.nn.Module, x: torch.Tensor) -> tuple[bytes, list[Any], dict[str, PieceCall]]:
    """A program holding ``model``'s Dynamo graph, serialised; the graph's inputs and the calls saved."""
    gm, inputs = bh.dynamo_graph(model, x)
    calls = {"submod_0": PieceCall("a-key", single_output=True, token_arg=None, num_args=len(inputs))}
    program = PiecewiseProgram(None, gm, calls, {"cache_dir": "/nowhere", "whole_layer": False}, CompileReport())
    return PiecewiseProgram.serialize_compile_artifacts(program), inputs, calls


class Installer:
    """Installs a loaded program's pieces as its graph itself, with a report of its own."""

    def __init__(self) -> None:
        self.calls = 0
        self.report = CompileReport(num_pieces=1)

    def install_saved(self, gm: fx.GraphModule, calls: dict[str, PieceCall],
                      state: dict[str, Any]) -> tuple[fx.GraphModule, CompileReport]:
        self.calls += 1
        return gm, self.report


def test_a_saved_program_comes_back_with_its_graph_calls_and_state() -> None:
    model, x = bh.Stack(2).eval(), torch.randn(4, 8)
    data, inputs, calls = saved(model, x)
    with loading_programs() as loaded:
        back = PiecewiseProgram.deserialize_compile_artifacts(data)
    assert loaded == [back]
    assert back.pieces == calls and back.state == {"cache_dir": "/nowhere", "whole_layer": False}
    sizes = [n.meta.get("example_value") for n in back.graph.graph.nodes if n.op == "placeholder"]
    x_at = next(i for i, a in enumerate(inputs) if a is x)
    assert sizes[x_at][:2] == tuple(x.shape), sizes  # kept for re-splitting (no tensors, no module stacks)
    with torch.no_grad():
        torch.testing.assert_close(back.graph(*inputs)[0], model(x))
    PiecewiseProgram.deserialize_compile_artifacts(data)  # outside the block: nobody collects it
    assert loaded == [back]


def test_a_loaded_program_runs_once_its_pieces_are_installed() -> None:
    model, x = bh.Stack(2).eval(), torch.randn(4, 8)
    data, inputs, _ = saved(model, x)
    back = PiecewiseProgram.deserialize_compile_artifacts(data)
    with pytest.raises(RuntimeError, match="ensure_loaded"):
        back(*inputs)
    with pytest.raises(RuntimeError, match="ensure_loaded"):
        back.report  # noqa: B018
    installer = Installer()
    back.ensure_loaded(installer)
    back.ensure_loaded(installer)  # the pieces are installed once
    assert installer.calls == 1 and back.report is installer.report
    with torch.no_grad():
        torch.testing.assert_close(back(*inputs)[0], model(x))


def test_a_program_saved_in_another_format_is_refused() -> None:
    data, _, _ = saved(bh.Stack(2).eval(), torch.randn(4, 8))
    blob = pickle.loads(data)
    blob["format"] = FORMAT_VERSION - 1
    with pytest.raises(ValueError, match=f"format {FORMAT_VERSION - 1}, this layerpass reads {FORMAT_VERSION}"):
        PiecewiseProgram.deserialize_compile_artifacts(pickle.dumps(blob))


@pytest.mark.slow
def test_split_ops_warm_start_loads_and_runs() -> None:
    """``split="ops"`` pieces take the token count as an argument: the saved program keeps the
    symbolic sizes its re-split needs, so a warm start runs (it used to fail on every call)."""
    cache = bh.fresh_cache_dir("split-ops")
    runs = [bh.run_python(bh.compile_zoo_body("llama", 2, cache, split="ops"), what=f"split=ops run {i}").result
            for i in range(2)]
    for res in runs:
        bh.assert_matches(torch.tensor(res["out"]), torch.tensor(res["ref"]), "split='ops' output")
    assert runs[1]["report"]["warm_start"] == "loaded" and runs[1]["report"]["dynamo_s"] == 0.0, runs[1]["report"]
