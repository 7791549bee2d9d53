"""The saved CPU ISA probe answer (``backend/pieces/isa_answer.py``): used only when it is this machine's
(same key) and says every ISA the CPU allows passed; anything else, a fault included, means
"probe as usual"; Inductor's switch is set only inside ``assume_valid``."""

from __future__ import annotations

import glob
import json
import os
from unittest import mock

import pytest
import torch

from layerpass.backend.pieces import isa_answer
from tests.helpers import backend as bh

pytestmark = pytest.mark.skipif(isa_answer._candidates() is None, reason="the answer is saved on x86 CPUs only")


def _saved(cache_dir: str) -> str:
    (path,) = glob.glob(os.path.join(cache_dir, "isa-probe", "*.json"))
    return path


def test_a_saved_answer_is_used_only_if_every_allowed_isa_passed() -> None:
    from torch._inductor import cpu_vec_isa

    cache = bh.fresh_cache_dir("isa")
    assert not isa_answer.saved_all_valid(cache)  # nothing saved yet
    isa_answer.save_answer(cache)  # runs (or reuses) this process's probe
    path = _saved(cache)
    with open(path) as f:
        saved = json.load(f)
    passed = {str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()}
    assert [c.split(" [")[0] for c in saved["valid"]] == [c.split(" [")[0] for c in saved["candidates"]
                                                          if c.split(" [")[0] in passed]
    assert isa_answer.saved_all_valid(cache) == (saved["valid"] == saved["candidates"])
    # an answer in which an ISA failed is never taken for "all passed"
    with open(path, "w") as f:
        json.dump({"candidates": saved["candidates"], "valid": saved["candidates"][1:]}, f)
    assert not isa_answer.saved_all_valid(cache)
    # a corrupted file: probe as usual
    with open(path, "w") as f:
        f.write("{not json")
    assert not isa_answer.saved_all_valid(cache)


def test_another_torch_or_compiler_is_another_key() -> None:
    cache = bh.fresh_cache_dir("isa-key")
    isa_answer.save_answer(cache)
    if not isa_answer.saved_all_valid(cache):
        pytest.skip("an ISA failed this machine's probe: no answer to reuse")
    with mock.patch.object(torch, "__version__", "0.0.0-other"):
        assert not isa_answer.saved_all_valid(cache)
    with mock.patch("torch._inductor.cpp_builder.get_compiler_version_info", return_value="another compiler"):
        assert not isa_answer.saved_all_valid(cache)
    assert isa_answer.saved_all_valid(cache)


def test_an_unwritable_cache_dir_costs_nothing_but_the_probe(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    isa_answer.save_answer(str(blocker))  # logged, not raised
    assert not isa_answer.saved_all_valid(str(blocker))


def test_inductors_switch_is_set_only_inside_assume_valid() -> None:
    from torch._inductor import config

    before = config.cpp.vec_isa_ok
    with isa_answer.assume_valid(False):
        assert config.cpp.vec_isa_ok is before
    with isa_answer.assume_valid(True):
        assert config.cpp.vec_isa_ok is True
    assert config.cpp.vec_isa_ok is before
    with config.patch({"cpp.vec_isa_ok": False}):
        assert isa_answer.user_decided()
