"""``layerpass/torch_compat.py``: what differs between torch 2.11 and 2.14, on the torch running the suite.

``make test-torch TORCH=2.14.1`` (CI) runs this module on another torch, so each check says what
it expects of the torch it runs on rather than of the pinned one."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from layerpass import torch_compat
from layerpass.ops import LayerName

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text,expected", [("2.11.0+cu130", (2, 11)), ("2.14.1", (2, 14)),
                                           ("2.15.0a0+git1234567", (2, 15)), ("3.0", (3, 0))])
def test_torch_version_reads_major_minor(text: str, expected: tuple[int, int]) -> None:
    assert torch_compat.torch_version(text) == expected


def test_torch_version_refuses_what_it_cannot_read() -> None:
    with pytest.raises(ValueError, match=r"'nightly'.*MAJOR\.MINOR"):
        torch_compat.torch_version("nightly")


def test_this_torch_is_supported_and_pyproject_states_the_range() -> None:
    low, high = torch_compat.SUPPORTED
    assert low <= torch_compat.TORCH_VERSION <= high, torch.__version__
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"torch>={low[0]}.{low[1]},<{high[0]}.{high[1] + 1}" in deps, deps
    readme = (ROOT / "README.md").read_text()
    assert f"torch {low[0]}.{low[1]} to {high[0]}.{high[1]}" in readme


def test_every_supported_torch_hoists_layer_names() -> None:
    assert torch_compat.HAS_OPAQUE_TYPE
    assert torch_compat.is_hoisted_constant(LayerName)
    assert not torch_compat.is_hoisted_constant(str)


def test_registration_matches_this_torch() -> None:
    """2.14 spells it ``register_custom_class(typ="constant")``; 2.11 to 2.13 ``register_opaque_type(typ="value")``;
    only 2.11 wants the class to be an ``OpaqueBaseMeta``."""
    from torch._library import opaque_object

    api = torch_compat.opaque_api()
    assert api is not None
    if hasattr(opaque_object, "register_custom_class"):
        assert (api.register, api.typ) == (opaque_object.register_custom_class, "constant")
    else:
        assert (api.register, api.typ) == (opaque_object.register_opaque_type, "value")
    if torch_compat.TORCH_VERSION < (2, 12):
        assert api.metaclass.__name__ == "OpaqueBaseMeta" and isinstance(LayerName, api.metaclass)
    else:
        assert api.metaclass is type and type(LayerName) is type


def test_no_opaque_module_means_no_hoisting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch._library.opaque_object", None)  # the import fails
    assert torch_compat.opaque_api() is None


def test_a_registration_without_hoist_means_no_hoisting(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch 2.10's ``register_opaque_type`` had no ``hoist``: a hoisted layer name is impossible there."""
    def register_opaque_type(cls: type, *, typ: str) -> None:
        raise AssertionError("not to be called")

    old = types.ModuleType("torch._library.opaque_object")
    old.register_opaque_type = register_opaque_type
    monkeypatch.setitem(sys.modules, "torch._library.opaque_object", old)
    assert torch_compat.opaque_api() is None


def test_every_supported_torch_has_the_aot_api() -> None:
    """Regions and the warm start need ``aot_compile`` and ``load_compiled_function`` (2.11 to 2.14 have them)."""
    assert torch_compat.aot_api_missing() is None and torch_compat.has_aot_api()


def test_a_torch_without_the_aot_loader_says_what_it_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch.compiler, "load_compiled_function")
    missing = torch_compat.aot_api_missing()
    assert missing == f"torch {torch_compat.TORCH_MAJOR_MINOR} lacks torch.compiler.load_compiled_function"
    assert not torch_compat.has_aot_api()


def test_region_per_layer_only_where_dynamo_guards_the_name_string() -> None:
    why = torch_compat.region_per_layer()
    assert (why is None) == (torch_compat.TORCH_VERSION >= (2, 12))
    if why is not None:
        assert why.startswith(f"torch {torch_compat.TORCH_MAJOR_MINOR}: ") and "own region" in why
