"""Inductor's CPU ISA probe started by ``layerpass.compile`` (``backend/pieces/isa_probe.py``): probing in a
background thread, or taking this machine's saved answer, Inductor ends up with exactly the ISA list
and pick of its own probe (fresh processes: the answer is cached per process)."""

from __future__ import annotations

import pytest

from tests.helpers import backend as bh

PROBE = """
from torch import nn
from torch._inductor import cpu_vec_isa
from layerpass.backend.pieces.isa_probe import probe_cpu_isa_in_background, wait_for_cpu_isa_probe, _assumed
if {layerpass!r}:
    probe_cpu_isa_in_background(nn.Linear(2, 2), {cache_dir!r})
    wait_for_cpu_isa_probe()
emit({{"picked": str(cpu_vec_isa.pick_vec_isa()), "valid": [str(i) for i in cpu_vec_isa.valid_vec_isa_list()],
       "assumed": bool(_assumed)}})
"""


def _probe(layerpass: bool, cache_dir: str | None = None) -> dict:
    return bh.run_python(PROBE.format(layerpass=layerpass, cache_dir=cache_dir), what="ISA probe process").result


@pytest.mark.slow
def test_the_background_probe_picks_what_inductor_picks() -> None:
    inductor = _probe(False)
    cache = bh.fresh_cache_dir("isa-probe")
    background, saving, from_saved = _probe(True), _probe(True, cache), _probe(True, cache)
    for got in (background, saving, from_saved):
        assert (got["picked"], got["valid"]) == (inductor["picked"], inductor["valid"]), (got, inductor)
    assert not background["assumed"] and not saving["assumed"]
    # the second process found the first one's answer (if every ISA passed here, else it probed again)
    from layerpass.backend.pieces.isa_answer import candidate_isas

    all_passed = [str(i) for i in candidate_isas() or []] == inductor["valid"]
    assert from_saved["assumed"] == (all_passed and bool(inductor["valid"]))
