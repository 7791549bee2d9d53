"""Entry points and configuration: ``CompilationConfig`` validation, the ``torch_dynamo_backends``
entry point (a fresh process that never imports ``layerpass`` before ``torch.compile``),
``layerpass.compile`` / ``last_compile_report`` and the INFO summary line.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import backend as bh
import layerpass
from layerpass.backend.config import CACHE_DIR_ENV, DEFAULT_SPLITTING_OPS, CompilationConfig


# ---------------------------------------------------------------- CompilationConfig
def test_defaults() -> None:
    cfg = CompilationConfig()
    assert cfg.split == "layers" and cfg.dynamic_tokens and not cfg.disable_cache and cfg.compile_sizes == ()
    assert set(cfg.splitting_ops) == set(DEFAULT_SPLITTING_OPS)
    assert "layerpass.unified_attention_with_output" in cfg.splitting_ops
    assert all([cfg.fuse_attn_quant, cfg.fuse_norm_quant, cfg.fuse_act_quant, cfg.fuse_moe, cfg.eliminate_noops])
    assert layerpass.CompilationConfig is CompilationConfig


def test_cache_dir_default_env_and_explicit(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)
    assert CompilationConfig().cache_dir == os.path.join(os.path.expanduser("~"), ".cache", "layerpass")
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "env"))
    assert CompilationConfig().cache_dir == str(tmp_path / "env")
    assert CompilationConfig(cache_dir=str(tmp_path / "x")).cache_dir == str(tmp_path / "x")
    # the cache location never changes compiled code, so it is not in the fingerprint
    assert CompilationConfig(cache_dir="/a").fingerprint() == CompilationConfig(cache_dir="/b").fingerprint()
    assert CompilationConfig(fuse_moe=False).fingerprint() != CompilationConfig().fingerprint()


@pytest.mark.parametrize("split", ["layer", "op", "", "LAYERS", None, 1])
def test_rejects_bad_split(split) -> None:
    with pytest.raises(ValueError, match=r"split=.*allowed: layers, ops"):
        CompilationConfig(split=split)


@pytest.mark.parametrize("ops", [("attention",), ("layerpass.a.b",), ("layerpass.",), (".op",), ("",)])
def test_rejects_badly_written_splitting_ops(ops) -> None:
    with pytest.raises(ValueError, match=r"namespace\.op_name"):
        CompilationConfig(splitting_ops=ops)


@pytest.mark.parametrize("ops", ["layerpass.unified_attention_with_output", (3,), ("layerpass.x", None), 7])
def test_rejects_splitting_ops_of_the_wrong_type(ops) -> None:
    with pytest.raises((TypeError, ValueError), match=r"splitting"):
        CompilationConfig(splitting_ops=ops)


def test_splitting_ops_accept_torch_spelling() -> None:
    assert CompilationConfig(splitting_ops=("layerpass::linear_attention",)).splitting_ops == ("layerpass.linear_attention",)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.one_of(st.integers(-3, 64), st.booleans(), st.floats(1, 8), st.text(max_size=2)), max_size=4))
def test_compile_sizes_validation(sizes) -> None:
    valid = all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes)
    if valid:
        assert CompilationConfig(compile_sizes=tuple(sizes)).compile_sizes == tuple(sorted(set(sizes)))
    else:
        with pytest.raises(ValueError, match=r"compile_sizes must be positive ints"):
            CompilationConfig(compile_sizes=tuple(sizes))


@pytest.mark.parametrize("sizes", [4, "4", None])
def test_compile_sizes_must_be_a_sequence(sizes) -> None:
    with pytest.raises((TypeError, ValueError), match=r"compile_sizes"):
        CompilationConfig(compile_sizes=sizes)


# ---------------------------------------------------------------- the entry point
def test_entry_point_is_registered() -> None:
    eps = [ep for ep in importlib.metadata.entry_points(group="torch_dynamo_backends") if ep.name == "layerpass"]
    assert len(eps) == 1, "pyproject's [project.entry-points.torch_dynamo_backends] is not installed (pip install -e .)"
    from layerpass.backend.compiler import layerpass_backend

    assert eps[0].value == "layerpass.backend.compiler:layerpass_backend"
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


# ---------------------------------------------------------------- layerpass.compile + the summary line
def test_compile_report_and_info_summary_line(caplog) -> None:
    caplog.set_level(logging.INFO, logger="layerpass")
    model = bh.Stack(4, seed=1).eval()
    x = torch.randn(5, 8)
    compiled = layerpass.compile(model, CompilationConfig(cache_dir=bh.fresh_cache_dir("info")))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
        x7 = torch.randn(7, 8)
        torch.testing.assert_close(compiled(x7), model(x7))
    r = layerpass.last_compile_report()
    lines = [m for m in caplog.messages if bh.SUMMARY_RE.fullmatch(m)]
    assert lines, caplog.messages
    n, u, c, h, secs = bh.SUMMARY_RE.fullmatch(lines[-1]).groups()
    assert (int(n), int(u), int(c), int(h)) == (r.num_pieces, r.num_unique_pieces, r.num_compiled, r.num_cache_hits)
    assert float(secs) == pytest.approx(r.total_s, abs=0.006)
    assert r.num_pieces == 4 and r.num_compiled == r.num_unique_pieces and r.num_cache_hits == 0  # a piece per layer
    assert r.dynamo_s >= 0 and r.compile_s > 0 and r.total_s >= r.compile_s and r.recompiles == 0
    assert isinstance(r.matches, dict)
    assert compiled.recompiles == 0


def test_unknown_splitting_op_is_rejected_when_the_backend_is_built() -> None:
    from layerpass.backend.compiler import LayerpassBackend
    from layerpass.backend.config import CompilationConfig

    with pytest.raises(ValueError, match="'layerpass.no_such_op' is not a registered torch op"):
        LayerpassBackend(CompilationConfig(split="ops", splitting_ops=("layerpass.no_such_op",)))
    LayerpassBackend(CompilationConfig(split="ops"))  # the defaults resolve
