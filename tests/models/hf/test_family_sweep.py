"""Every ``*ForCausalLM`` transformers ships (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``), as a tiny
random model (``family_sweep.py``): ``from_transformers`` either refuses it at conversion with
``UnsupportedArchitectureError`` / ``UnsupportedModuleError`` naming why, or ``layerpass.compile``
runs it as regions and its greedy tokens equal HF ``generate()``.

A family whose config cannot be made tiny generically, needs downloads or extra packages, or
whose own HF forward fails on the tiny config is skipped with the reason. A crash or a token
difference fails, except the families in ``KNOWN_CRASHES`` (strict xfail: each is recorded with
its cause, and one that starts working fails until it is taken off the list).

One parametrized case per family, so xdist spreads them; they share the session's Inductor
cache (families built alike compile once) and one layerpass cache dir. Every family takes about
an hour of CPU on 2 cores, more than CI has: CI runs a fixed sample (every ``SAMPLE_EVERY``-th
family by name, plus the known crashes), ``make test-sweep`` (``LAYERPASS_TEST_SWEEP=all``) all of them.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("transformers")

from tests.helpers import backend as bh  # noqa: E402
from tests.models.hf import family_sweep as fs  # noqa: E402

# model_type -> the crash, as the sweep found it on transformers 5.25 (issue 29)
KNOWN_CRASHES: dict[str, str] = {}
# families that once crashed here, kept in the sample: DeepSeek-V4 and Doge branch on the token count
# (a trace with it unbacked fails), so their regions are traced with it backed (issue 29)
ONCE_CRASHED = ("deepseek_v4", "doge")


_CACHE_DIR: list[str] = []


def _cache_dir() -> str:
    if not _CACHE_DIR:
        _CACHE_DIR.append(bh.fresh_cache_dir("family-sweep"))
    return _CACHE_DIR[0]


SAMPLE_EVERY = 8


def _families() -> list[str]:
    families = sorted(fs.causal_lm_families())
    if os.environ.get("LAYERPASS_TEST_SWEEP") == "all":
        return families
    kept = {*KNOWN_CRASHES, *ONCE_CRASHED, *ALWAYS}
    return [t for i, t in enumerate(families) if i % SAMPLE_EVERY == 0 or t in kept]


# families the suite's own tests build by hand (tests/models/hf/zoo.py) are in the sample too
ALWAYS = ("llama", "qwen2", "gemma2", "mixtral", "jetmoe")


def _params() -> list:
    marks = {t: pytest.mark.xfail(reason=why, strict=True) for t, why in KNOWN_CRASHES.items()}
    return [pytest.param(t, marks=marks.get(t, ())) for t in _families()]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", _params())
def test_family(model_type: str) -> None:
    outcome = fs.sweep_family(model_type, _cache_dir())
    if outcome.kind == "skipped":
        pytest.skip(outcome.why)
    if outcome.kind == "refused":
        assert "from_transformers" in outcome.why or "layerpass" in outcome.why, outcome.why
        return
    assert outcome.kind == "equal", f"{model_type}: {outcome.kind}: {outcome.why}"
