"""``CompilationConfig`` validates every field when it is built, naming the field and what is allowed."""

from __future__ import annotations

import os
import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import layerpass
from layerpass.backend.config import CACHE_DIR_ENV, CompilationConfig
from layerpass.ops.library import split_point_ops

BOOL_FIELDS = ("fuse_attn_quant", "fuse_norm_quant", "fuse_act_quant", "fuse_moe", "eliminate_noops",
               "disable_cache", "dynamic_tokens")
NOT_BOOLS = ["no", "false", "False", "", 0, 1, None, 1.0, [], "0"]


@pytest.mark.parametrize("name", BOOL_FIELDS)
@pytest.mark.parametrize("value", NOT_BOOLS)
def test_bool_fields_take_only_real_bools(name: str, value) -> None:
    with pytest.raises(TypeError, match=rf"CompilationConfig\.{name} must be a bool \(True or False\), got {type(value).__name__}"):
        CompilationConfig(cache_dir="/tmp/x", **{name: value})


@pytest.mark.parametrize("name", BOOL_FIELDS)
def test_bool_fields_keep_their_value(name: str) -> None:
    for value in (True, False):
        assert getattr(CompilationConfig(cache_dir="/tmp/x", **{name: value}), name) is value


@pytest.mark.parametrize("value", ["", 123, b"/tmp/x", 1.5, ["/tmp"], True, "   "])
def test_cache_dir_must_be_a_non_empty_path(value) -> None:
    with pytest.raises((TypeError, ValueError), match=r"CompilationConfig\.cache_dir must be a non-empty str or os\.PathLike"):
        CompilationConfig(cache_dir=value)


def test_cache_dir_accepts_str_and_pathlike(tmp_path: pathlib.Path) -> None:
    assert CompilationConfig(cache_dir=str(tmp_path)).cache_dir == str(tmp_path)
    cfg = CompilationConfig(cache_dir=tmp_path / "c")
    assert cfg.cache_dir == os.fspath(tmp_path / "c") and isinstance(cfg.cache_dir, str)


def test_empty_cache_dir_never_means_the_working_directory() -> None:
    """Before: ``cache_dir=""`` was kept and the cache wrote ``./artifacts``."""
    with pytest.raises(ValueError, match=r"cache_dir"):
        CompilationConfig(cache_dir="")


@pytest.mark.parametrize("value", [["x"], "x", None, 3, {1: True}, {("a",): 1}])
def test_inductor_options_must_be_a_dict_with_str_keys(value) -> None:
    with pytest.raises(TypeError, match=r"CompilationConfig\.inductor_options must be a dict with str keys"):
        CompilationConfig(cache_dir="/tmp/x", inductor_options=value)


def test_inductor_options_may_not_replace_the_pass_manager() -> None:
    with pytest.raises(ValueError, match=r"inductor_options.*post_grad_custom_post_pass.*fuse_"):
        CompilationConfig(cache_dir="/tmp/x", inductor_options={"post_grad_custom_post_pass": None})


def test_inductor_options_are_copied() -> None:
    opts = {"max_autotune": False}
    cfg = CompilationConfig(cache_dir="/tmp/x", inductor_options=opts)
    opts["max_autotune"] = True
    assert cfg.inductor_options == {"max_autotune": False}


@pytest.mark.parametrize("key,suggestion", [("max_autotun", "'max_autotune'"), ("triton.cudagraph", "'triton.cudagraphs'"),
                                            ("zzz_not_an_option", None), ("triton", "'triton.")])
def test_inductor_options_must_name_inductor_config(key: str, suggestion: str | None) -> None:
    """Before: any key was kept, and failed (or was ignored) only when a piece compiled."""
    with pytest.raises(ValueError, match=rf"inductor_options: '{key}' is not an Inductor config name") as e:
        CompilationConfig(cache_dir="/tmp/x", inductor_options={"max_autotune": False, key: True})
    assert (f"did you mean {suggestion}" in str(e.value)) if suggestion else "did you mean" not in str(e.value)


def test_inductor_options_take_plain_and_dotted_names() -> None:
    opts = {"max_autotune": False, "triton.cudagraphs": False, "enable_auto_functionalized_v2": False}
    assert CompilationConfig(cache_dir="/tmp/x", inductor_options=opts).inductor_options == opts


def test_cache_dir_with_a_nul_byte_is_refused() -> None:
    with pytest.raises(ValueError, match=r"cache_dir must be a directory path without NUL bytes, got '/tmp/a\\x00b'"):
        CompilationConfig(cache_dir="/tmp/a\0b")


@pytest.mark.parametrize("value", ["layer", "op", "", "LAYERS", 1, None, ["layers"], b"layers"])
def test_a_bad_split_names_the_field_and_the_allowed_values(value) -> None:
    with pytest.raises(ValueError, match=r"CompilationConfig\.split=.*allowed: layers, ops"):
        CompilationConfig(cache_dir="/tmp/x", split=value)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(BOOL_FIELDS),
       value=st.one_of(st.text(max_size=5), st.integers(), st.none(), st.floats(allow_nan=False), st.booleans()))
def test_any_non_bool_is_rejected_any_bool_kept(name: str, value) -> None:
    if isinstance(value, bool):
        assert getattr(CompilationConfig(cache_dir="/tmp/x", **{name: value}), name) is value
    else:
        with pytest.raises(TypeError, match=rf"CompilationConfig\.{name}"):
            CompilationConfig(cache_dir="/tmp/x", **{name: value})


def test_defaults() -> None:
    cfg = CompilationConfig()
    assert isinstance(cfg.cache_dir, str) and cfg.cache_dir
    assert cfg.fingerprint() == CompilationConfig(cache_dir="/elsewhere").fingerprint()
    assert cfg.split == "layers" and cfg.dynamic_tokens and not cfg.disable_cache and cfg.compile_sizes == ()
    assert set(cfg.splitting_ops) == set(split_point_ops())  # the ops defined with splits=True
    assert "layerpass.unified_attention_with_output" in cfg.splitting_ops
    assert all([cfg.fuse_attn_quant, cfg.fuse_norm_quant, cfg.fuse_act_quant, cfg.fuse_moe, cfg.eliminate_noops])
    assert layerpass.CompilationConfig is CompilationConfig


# ---------------------------------------------------------------- defaults, cache dir, splitting ops, sizes
def test_cache_dir_default_env_and_explicit(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)
    assert CompilationConfig().cache_dir == os.path.join(os.path.expanduser("~"), ".cache", "layerpass")
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "env"))
    assert CompilationConfig().cache_dir == str(tmp_path / "env")
    assert CompilationConfig(cache_dir=str(tmp_path / "x")).cache_dir == str(tmp_path / "x")
    # the cache location never changes compiled code, so it is not in the fingerprint
    assert CompilationConfig(cache_dir="/a").fingerprint() == CompilationConfig(cache_dir="/b").fingerprint()
    assert CompilationConfig(fuse_moe=False).fingerprint() != CompilationConfig().fingerprint()


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


def test_cache_dir_expands_home_and_variables(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: ``cache_dir="~/..."`` (config or ``$LAYERPASS_CACHE_DIR``) made a directory named ``~``."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LP_TEST_ROOT", str(tmp_path / "root"))
    assert CompilationConfig(cache_dir="~/lp").cache_dir == str(tmp_path / "home" / "lp")
    assert CompilationConfig(cache_dir="$LP_TEST_ROOT/lp").cache_dir == str(tmp_path / "root" / "lp")
    assert CompilationConfig(cache_dir="${LP_TEST_ROOT}/lp").cache_dir == str(tmp_path / "root" / "lp")
    monkeypatch.setenv("LAYERPASS_CACHE_DIR", "~/from-env")
    assert CompilationConfig().cache_dir == str(tmp_path / "home" / "from-env")
    monkeypatch.delenv("LP_TEST_UNSET", raising=False)
    with pytest.raises(ValueError, match=r"cache_dir '\$LP_TEST_UNSET/lp' names \$LP_TEST_UNSET, which is not set"):
        CompilationConfig(cache_dir="$LP_TEST_UNSET/lp")


def test_a_relative_cache_dir_is_made_absolute_at_construction(tmp_path: pathlib.Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: it was resolved at write time, so a ``chdir`` after ``layerpass.compile`` moved the cache."""
    import torch

    from tests.helpers import backend as bh

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    cfg = CompilationConfig(cache_dir="rel-cache")
    assert cfg.cache_dir == str(tmp_path / "a" / "rel-cache")
    monkeypatch.setenv("LAYERPASS_CACHE_DIR", "env-rel")
    assert CompilationConfig().cache_dir == str(tmp_path / "a" / "env-rel")
    compiled = layerpass.compile(bh.Stack(2).eval(), cfg)
    monkeypatch.chdir(tmp_path / "b")
    with torch.no_grad():
        compiled(torch.randn(3, 8))
    assert (tmp_path / "a" / "rel-cache").is_dir() and not (tmp_path / "b" / "rel-cache").exists()


@pytest.mark.parametrize("options,fragment", [
    ({"max_autotune": "banana"}, r"'max_autotune' takes a bool \(its default is False\), got str 'banana'"),
    ({"max_autotune": 1}, r"'max_autotune' takes a bool"),
    ({"triton.cudagraphs": "yes"}, r"'triton.cudagraphs' takes a bool"),
    ({"unbacked_symint_fallback": 2.5}, r"'unbacked_symint_fallback' takes an int"),
    ({"unbacked_symint_fallback": True}, r"'unbacked_symint_fallback' takes an int"),
    ({"cpu_gpu_bw": "fast"}, r"'cpu_gpu_bw' takes a float"),
])
def test_inductor_option_values_are_type_checked(options, fragment) -> None:
    """Before: ``inductor_options={"max_autotune": "banana"}`` was accepted."""
    with pytest.raises(TypeError, match=rf"CompilationConfig.inductor_options: {fragment}"):
        CompilationConfig(cache_dir="/tmp/x", inductor_options=options)


def test_inductor_option_values_of_the_right_type_pass() -> None:
    opts = {"max_autotune": True, "unbacked_symint_fallback": 4096, "cpu_gpu_bw": 10, "triton.cudagraphs": False}
    assert CompilationConfig(cache_dir="/tmp/x", inductor_options=opts).inductor_options == opts


def test_a_field_set_after_construction_is_checked_again(tmp_path: pathlib.Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: ``cfg.split = "bogus"`` after construction was kept unchecked."""
    cfg = CompilationConfig(cache_dir="/tmp/x")
    with pytest.raises(ValueError, match=r"CompilationConfig.split='bogus'"):
        cfg.split = "bogus"
    with pytest.raises(TypeError, match=r"CompilationConfig.fuse_moe must be a bool"):
        cfg.fuse_moe = "no"
    with pytest.raises(TypeError, match=r"CompilationConfig.inductor_options: 'max_autotune' takes a bool"):
        cfg.inductor_options = {"max_autotune": "banana"}
    assert (cfg.split, cfg.fuse_moe, cfg.inductor_options) == ("layers", True, {})  # unchanged
    cfg.split = "ops"
    cfg.compile_sizes = [8, 2, 8]
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg.cache_dir = "~/lp"
    assert (cfg.split, cfg.compile_sizes, cfg.cache_dir) == ("ops", (2, 8), str(tmp_path / "lp"))  # normalised
    with pytest.raises(AttributeError, match=r"CompilationConfig has no field 'splt'.*did you mean 'split'"):
        cfg.splt = "layers"


@pytest.mark.parametrize("thing", [{"a": 1}, lambda x: x, None, "model"])
def test_compile_needs_a_module(thing) -> None:
    """Before: ``layerpass.compile({...})`` and ``layerpass.compile(lambda ...)`` gave an AttributeError."""
    with pytest.raises(TypeError, match=r"layerpass.compile needs a torch.nn.Module.*got "):
        layerpass.compile(thing)


def test_compile_needs_a_config() -> None:
    from tests.helpers import backend as bh

    with pytest.raises(TypeError, match=r"layerpass.compile: config must be a CompilationConfig or None, got dict"):
        layerpass.compile(bh.Stack(2), {"split": "ops"})
