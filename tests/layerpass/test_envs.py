"""``VLLM_USE_LAYERNAME`` / ``HAS_OPAQUE_TYPE`` / ``USE_LAYERNAME`` (``layerpass/envs.py``).

The switch is read once at import, so each setting is checked by executing ``envs.py``
module afresh (a private module object, leaving the imported one alone) or, for what
must happen at ``import layerpass``, in a subprocess.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import layerpass
from layerpass import envs as config
from layerpass import torch_compat

ON = ["1", "true", "yes", "on"]
OFF = ["0", "false", "no", "off"]


def fresh_config(monkeypatch: pytest.MonkeyPatch, value: str | None) -> ModuleType:
    """Execute ``layerpass/envs.py`` with ``VLLM_USE_LAYERNAME=value`` (None: unset)."""
    if value is None:
        monkeypatch.delenv("VLLM_USE_LAYERNAME", raising=False)
    else:
        monkeypatch.setenv("VLLM_USE_LAYERNAME", value)
    spec = importlib.util.spec_from_file_location("_layerpass_config_under_test", config.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def any_case(word: str) -> st.SearchStrategy[str]:
    return st.tuples(*[st.sampled_from(sorted({c.lower(), c.upper()})) for c in word]).map("".join)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(ON + OFF).flatmap(lambda w: st.tuples(st.just(w), any_case(w))))
def test_parse_every_allowed_value_any_case(word_and_cased) -> None:
    word, cased = word_and_cased
    assert config.parse_bool_env("VLLM_USE_LAYERNAME", cased, default=False) is (word in ON)


def test_unset_means_default() -> None:
    assert config.parse_bool_env("X", None, default=True) is True
    assert config.parse_bool_env("X", None, default=False) is False


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=8).filter(lambda s: s.strip().lower() not in ON + OFF))
def test_parse_rejects_anything_else(value: str) -> None:
    with pytest.raises(ValueError) as info:
        config.parse_bool_env("VLLM_USE_LAYERNAME", value, default=True)
    message = str(info.value)
    assert "VLLM_USE_LAYERNAME" in message and repr(value) in message
    assert all(word in message for word in ON + OFF)


@pytest.mark.parametrize("value", [None, *ON, *OFF, "TRUE", "Off", "YeS", "oN"])
def test_module_constants_for_each_value(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    cfg = fresh_config(monkeypatch, value)
    env_on = value is None or value.lower() in ON
    assert cfg.LAYERNAME_ENV_ON is env_on
    assert cfg.USE_LAYERNAME is (cfg.HAS_OPAQUE_TYPE and env_on)


def test_has_opaque_type_is_torch_compat_s() -> None:
    """The switch's torch half comes from ``torch_compat`` (tested there); the package re-exports both."""
    assert config.HAS_OPAQUE_TYPE is torch_compat.HAS_OPAQUE_TYPE
    assert layerpass.HAS_OPAQUE_TYPE is config.HAS_OPAQUE_TYPE and layerpass.USE_LAYERNAME is config.USE_LAYERNAME


def test_torch_without_opaque_types_falls_back_to_str(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without hoistable opaque types (torch < 2.11) the switch is off even when asked on."""
    monkeypatch.setattr(torch_compat, "HAS_OPAQUE_TYPE", False)
    cfg = fresh_config(monkeypatch, "1")
    assert cfg.HAS_OPAQUE_TYPE is False and cfg.LAYERNAME_ENV_ON is True and cfg.USE_LAYERNAME is False


def run_python(code: str, value: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VLLM_USE_LAYERNAME": value}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=120)


def test_invalid_value_fails_at_import() -> None:
    proc = run_python("import layerpass", "maybe")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError"), proc.stderr
    assert "VLLM_USE_LAYERNAME" in last and "'maybe'" in last
    assert all(word in last for word in ON + OFF), last


@pytest.mark.parametrize("value,expected", [("OFF", False), ("Yes", True)])
def test_switch_in_a_fresh_process(value: str, expected: bool) -> None:
    """The whole package (schemas included) follows the variable set before import."""
    proc = run_python(
        """
        import torch, layerpass, layerpass.ops as ops
        from layerpass.ops.library import schema_of
        schema = schema_of(ops.op_overload("moe_forward"))
        arg = [a for a in schema.arguments if a.name == "layer_name"][0]
        print(layerpass.USE_LAYERNAME, ops.LayerNameType.__name__, type(ops.encode_layer_name("a")).__name__,
              isinstance(arg.type, torch._C.StringType))
        """,
        value,
    )
    assert proc.returncode == 0, proc.stderr
    use, type_name, encoded, schema_is_str = proc.stdout.split()
    on = expected and config.HAS_OPAQUE_TYPE
    assert use == str(on)
    assert type_name == encoded == ("LayerName" if on else "str")
    assert schema_is_str == str(not on)


def test_remote_cache_and_secret_are_read_on_each_call(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, read, as_set in [("LAYERPASS_REMOTE_CACHE", config.remote_cache_url, " value as set \n"),
                               ("LAYERPASS_CACHE_SECRET", config.cache_secret, b" value as set \n")]:
        monkeypatch.delenv(name, raising=False)
        assert read() is None
        monkeypatch.setenv(name, "")
        assert read() is None
        monkeypatch.setenv(name, " value as set \n")
        assert read() == as_set  # never trimmed: every machine must hold the same bytes
