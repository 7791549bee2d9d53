"""The ``layerpass`` compile backend (``backend/pieces/compiler.py``), observed through what it compiles.

- Identical pieces compile once: ``layerpass.compile`` gives one piece per decoder layer; with the
  switch on, unique compiled pieces do not grow with layers (1 for llama: the first layer gets a
  zero residual, so it is one piece with the rest); with ``VLLM_USE_LAYERNAME=0`` (a subprocess: the switch is
  read at import) every layer's piece is unique. Compiled llama and moe match eager.
- ``split="ops"`` runs the splitting ops eagerly between compiled pieces; an unknown splitting op
  is rejected up front.
- A piece's key holds the compilation config: the same config is served from the cache, another
  one compiles (the pass uuids' share: ``tests/passes/test_uuid.py``).
- ``torch.compile(model, backend="layerpass")``: the whole model, split per layer; the
  ``torch_dynamo_backends`` entry point (a fresh process that never imports ``layerpass`` first).
"""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

import layerpass
from layerpass.backend.config import CACHE_DIR_ENV, CompilationConfig
from tests.helpers import backend as bh


@pytest.fixture(scope="module")
def llama2() -> bh.Compiled:
    return bh.compiled_zoo("llama", 2)


@pytest.fixture(scope="module")
def llama8() -> bh.Compiled:
    return bh.compiled_zoo("llama", 8)


def _layer_keys(report) -> dict[int, str]:
    return {p.layer: p.key for p in report.pieces if p.layer is not None}


@pytest.mark.parametrize("layers", [2, 8])
def test_llama_matches_eager(layers: int, request) -> None:
    c = request.getfixturevalue(f"llama{layers}")
    bh.assert_matches(c.out, c.ref, f"llama-{layers}")
    assert c.compiled.recompiles == 0


@pytest.mark.parametrize("layers", [2, 8])
def test_one_piece_per_layer(layers: int, request) -> None:
    r = request.getfixturevalue(f"llama{layers}").report
    assert r.split == "layers" and r.trace == "regions"
    assert r.num_pieces == layers, r.summary()
    assert sorted(_layer_keys(r)) == list(range(layers)), [(p.name, p.layer) for p in r.pieces]
    assert r.num_eager_pieces == 0
    # a fresh cache dir: every unique piece was compiled exactly once, nothing came from the cache
    assert r.num_compiled == r.num_unique_pieces and r.num_cache_hits == 0
    assert r.num_unique_pieces == len({p.key for p in r.pieces})


def test_unique_pieces_do_not_grow_with_layers(llama2: bh.Compiled, llama8: bh.Compiled) -> None:
    if not layerpass.USE_LAYERNAME:
        pytest.skip("this process runs with the layer-name switch off")
    assert llama8.report.num_unique_pieces == 1, llama8.report.summary()
    assert llama8.report.num_unique_pieces == llama2.report.num_unique_pieces
    keys = _layer_keys(llama8.report)
    assert len({keys[i] for i in range(8)}) == 1, "every layer, the first included, must share one artifact"
    # a shared piece carries no layer name as a constant: the name is a graph input
    assert not any("layers." in str(c[2]) for p in llama8.report.pieces for c in p.constants)
    sources = [p.source for p in llama8.report.pieces if p.layer is not None and p.layer >= 2]
    assert sources == ["shared"] * 6


@pytest.mark.slow
def test_moe_matches_eager_and_shares_pieces() -> None:
    c = bh.compiled_zoo("moe", 8)
    bh.assert_matches(c.out, c.ref, "moe-8")
    assert c.report.num_pieces == 8
    assert c.report.num_unique_pieces == 1, c.report.summary()


@pytest.mark.slow
def test_switch_off_every_layer_is_unique() -> None:
    """``VLLM_USE_LAYERNAME=0``: the layer name is a str constant, so no two layers share a piece."""
    dirs = [bh.fresh_cache_dir("off2"), bh.fresh_cache_dir("off3")]
    body = f"""
    from tests.helpers import backend as bh
    import layerpass
    out = {{"use_layername": layerpass.USE_LAYERNAME}}
    for layers, d in ((2, {dirs[0]!r}), (3, {dirs[1]!r})):
        c = bh.compile_zoo("llama", layers, cache_dir=d)
        bh.assert_matches(c.out, c.ref, f"llama-{{layers}} with the switch off")
        out[str(layers)] = bh.report_dict(c.report)
    emit(out)
    """
    res = bh.run_python(body, env=bh.subprocess_env(VLLM_USE_LAYERNAME="0"), what="VLLM_USE_LAYERNAME=0 compile").result
    assert res["use_layername"] is False
    r2, r3 = res["2"], res["3"]
    assert r2["num_unique_pieces"] == 2 and r3["num_unique_pieces"] == 3, (r2["num_unique_pieces"], r3["num_unique_pieces"])
    assert r2["num_regions"] == 2 and r3["num_regions"] == 3, "each layer's name is a constant: one trace per layer"
    for r, layers in ((r2, 2), (r3, 3)):
        layer_pieces = [p for p in r["pieces"] if p["layer"] is not None]
        assert len({p["key"] for p in layer_pieces}) == layers
        for p in layer_pieces:  # each layer's piece holds its own name as a str constant
            assert any(f"layers.{p['layer']}." in c for c in p["constants"]), p


def test_split_ops_runs_attention_eagerly() -> None:
    c = bh.compiled_zoo("llama", 2, "ops")
    bh.assert_matches(c.out, c.ref, "llama-2 split='ops'")
    r = c.report
    assert r.split == "ops"
    eager = [p for p in r.pieces if p.kind == "eager"]
    assert r.num_eager_pieces == len(eager) == 2  # one attention op per layer
    assert all(p.source == "eager" and p.key is None for p in eager)
    assert r.num_pieces == 4  # compiled, per layer: before its attention and after it
    assert any("fusion" in n for n in r.notes), r.notes


def test_an_unknown_splitting_op_is_rejected_up_front() -> None:
    config = CompilationConfig(split="ops", splitting_ops=("layerpass.no_such_op",), cache_dir=bh.fresh_cache_dir("bad-op"))
    with pytest.raises(ValueError, match="'layerpass.no_such_op' is not a registered torch op"):
        layerpass.compile(bh.Stack(2).eval(), config)
    config = CompilationConfig(split="ops", cache_dir=bh.fresh_cache_dir("default-ops"))
    layerpass.compile(bh.Stack(2).eval(), config)  # the default splitting ops resolve


# ---------------------------------------------------------------- what a piece's key holds
def test_the_config_is_in_every_piece_key() -> None:
    """One cache dir, three compiles of one model: the same config again is served from the cache
    with the same keys; a config that differs (even in a pass this model never uses) compiles anew."""
    cache = bh.fresh_cache_dir("config-key")

    def compile_stack(**config) -> layerpass.CompileReport:
        model, x = bh.Stack(3).eval(), torch.randn(5, 8)
        with torch.no_grad():
            torch.testing.assert_close(layerpass.compile(model, CompilationConfig(cache_dir=cache, **config))(x), model(x))
        return layerpass.last_compile_report()

    def keys(report: layerpass.CompileReport) -> set[str]:
        return {p.key for p in report.pieces}

    cold, warm, other = compile_stack(), compile_stack(), compile_stack(fuse_moe=False)
    assert (cold.num_compiled, cold.num_cache_hits) == (1, 0) and len(keys(cold)) == 1, cold.summary()
    assert (warm.num_compiled, warm.num_cache_hits) == (0, 1) and keys(warm) == keys(cold), warm.summary()
    assert (other.num_compiled, other.num_cache_hits) == (1, 0) and keys(other).isdisjoint(keys(cold)), other.summary()


# ---------------------------------------------------------------- the whole model: backend="layerpass"
def test_torch_compile_with_the_backend_name_splits_the_whole_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """One Dynamo graph for the whole model, cut into a prologue, a piece per layer and an epilogue;
    identical layers share one compiled artifact."""
    monkeypatch.setenv(CACHE_DIR_ENV, bh.fresh_cache_dir("backend-name"))  # the default config reads it
    model, x = bh.Stack(3).eval(), torch.randn(6, 8)
    with torch.no_grad():
        bh.assert_matches(torch.compile(model, backend="layerpass")(x), model(x), 'backend="layerpass"')
    r = layerpass.last_compile_report()
    assert r.trace == "whole-model" and r.split == "layers"
    assert [p.layer for p in r.pieces] == [None, 0, 1, 2, None], [(p.name, p.layer) for p in r.pieces]
    layer_keys = [p.key for p in r.pieces if p.layer is not None]
    assert layer_keys[1] == layer_keys[2] and r.num_compiled == r.num_unique_pieces == len({p.key for p in r.pieces})
    assert [p.source for p in r.pieces].count("shared") == r.num_pieces - r.num_unique_pieces >= 1


# ---------------------------------------------------------------- the entry point
def test_entry_point_is_registered() -> None:
    eps = [ep for ep in importlib.metadata.entry_points(group="torch_dynamo_backends") if ep.name == "layerpass"]
    assert len(eps) == 1, "pyproject's [project.entry-points.torch_dynamo_backends] is not installed (pip install -e .)"
    from layerpass.backend.pieces.compiler import layerpass_backend  # the name pyproject's entry point gives

    assert eps[0].value == "layerpass.backend.pieces.compiler:layerpass_backend"
    assert eps[0].load() is layerpass_backend


ENTRY_BODY = """\
import logging, sys
logging.basicConfig(level=logging.INFO)
from tests.helpers import backend as bh
assert "layerpass" not in sys.modules, "backend_helpers must not import layerpass"
model = bh.Stack(3).eval()
x = torch.randn(6, 8)
with torch.no_grad():
    ref = model(x)
    out = torch.compile(model, backend="layerpass")(x)
imported_by_compile = "layerpass" in sys.modules
import layerpass
r = layerpass.last_compile_report()
emit({"imported_by_compile": imported_by_compile, "err": (out - ref).abs().max().item(),
      "report": bh.report_dict(r), "backends": torch._dynamo.list_backends()})
"""


@pytest.mark.slow
def test_torch_compile_backend_string_without_importing_layerpass() -> None:
    env = bh.subprocess_env(**{CACHE_DIR_ENV: bh.fresh_cache_dir("entry")})
    proc = bh.run_python(ENTRY_BODY, env=env, what='torch.compile(backend="layerpass")')
    res = proc.result
    assert res["imported_by_compile"], "torch.compile resolved 'layerpass' without loading the package?"
    assert "layerpass" in res["backends"]
    assert res["err"] <= 1e-5, res["err"]
    r = res["report"]
    assert r["num_pieces"] == 5 and r["split"] == "layers"  # prologue, 3 blocks, epilogue
    assert r["num_compiled"] == r["num_unique_pieces"] <= 4  # blocks 1 and 2 are identical
    line = bh.SUMMARY_RE.search(proc.stderr)  # the INFO line, through the script's logging.basicConfig
    assert line and int(line.group(1)) == r["num_pieces"], proc.stderr[-2000:]


class SizeDispatch(torch.nn.Module):
    """Rows grouped by a data-dependent rule, each group's size read on the host (``.tolist()``),
    as an MoE's experts dispatch: the layer's trace makes unbacked symbols of its own."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = (x[:, 0] > 0).long()
        sizes = (group[:, None] == torch.arange(2)).sum(0).tolist()
        order = torch.argsort(group, stable=True)
        low, high = torch.split(x[order], sizes)
        out = torch.cat([self.proj(low), high * 2])
        return out[torch.argsort(order, stable=True)] + x


@pytest.mark.parametrize("path", ["regions", pytest.param("whole-model", marks=pytest.mark.slow)])
def test_unbacked_symbols_made_inside_a_piece(path: str) -> None:
    """Issue 29: a layer whose trace makes unbacked symbols (JetMoe's experts) crashed its piece's
    compile with ``PendingUnbackedSymbolNotFound``: the backend re-ran the piece on fake tensors,
    leaving fresh symbols no node binds."""
    torch.manual_seed(0)
    model = bh.Chain([SizeDispatch(), SizeDispatch()]).eval()
    x = torch.randn(6, 8)
    config = CompilationConfig(cache_dir=bh.fresh_cache_dir(f"unbacked-{path}"))
    compiled = layerpass.compile(model, config) if path == "regions" else torch.compile(model, backend="layerpass")
    with torch.no_grad():
        for n in (6, 9):  # a second token count: no recompile needed to be right
            x = torch.randn(n, 8)
            torch.testing.assert_close(compiled(x), model(x))
    if path == "regions":
        assert layerpass.last_compile_report().trace == "regions"


def test_a_restart_request_is_not_a_backend_failure() -> None:
    """Issue 29 (family sweep: Aria, FlexOlmo after other families in one process): Dynamo asks
    the backend's caller to trace again (``TensorifyScalarRestartAnalysis``, a float it made
    dynamic); a region trace took that for a layerpass failure and crashed. It passes through,
    unrecorded, so Dynamo restarts."""
    from layerpass.backend.pieces.compiler import LayerpassBackend

    backend = LayerpassBackend(CompilationConfig(disable_cache=True))

    def restart(gm, example_inputs, whole_layer=False):
        raise torch._dynamo.exc.TensorifyScalarRestartAnalysis()

    backend.compile_graph = restart
    compiler = backend.for_layer()
    with pytest.raises(torch._dynamo.exc.RestartAnalysis):
        compiler(None, [])
    assert compiler.failure is None
