"""``bench/schema.py``: valid rows and documents pass; every corruption is rejected, naming the field."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerpass.bench.rows import skipped_row
from layerpass.bench.schema import ROW_FIELDS, SCHEMA_VERSION, STATUSES, empty_row, validate_results, validate_row
from tests.bench.fakes import valid_row

CORRUPTIONS = {
    "drop a field": lambda r, k: r.pop(k),
    "add a field": lambda r, k: r.__setitem__(k + "_extra", 1),
    "wrong type": lambda r, k: r.__setitem__(k, [1]),
}


@settings(max_examples=40, deadline=None)
@given(field=st.sampled_from(sorted(ROW_FIELDS)), how=st.sampled_from(sorted(CORRUPTIONS)))
def test_corrupted_rows_are_rejected_naming_the_field(field, how) -> None:
    row = valid_row()
    validate_row(row)
    CORRUPTIONS[how](row, field)
    with pytest.raises(ValueError, match=field):
        validate_row(row)


@pytest.mark.parametrize("change, message", [
    ({"status": "great"}, "status"), ({"mode": "jit"}, "mode"), ({"layers": 0}, "layers"),
    ({"status": "failed", "reason": None}, "reason"), ({"first_call_s": None}, "lacks"),
    ({"fusion_matches": {"x": "1"}}, "fusion_matches"), ({"compile_s": -1.0}, "compile_s"),
    ({"pieces": True}, "pieces"), ({"num_regions": -1}, "num_regions"), ({"warm_dynamo_s": -0.5}, "warm_dynamo_s"),
    ({"cold_timeline": [{"what": "x", "start_s": 0.0}]}, "cold_timeline"),
    ({"warm_timeline": [{"what": 1, "start_s": 0.0, "end_s": 1.0, "duration_s": 1.0}]}, "warm_timeline"),
])
def test_semantic_checks(change: dict, message: str) -> None:
    row = valid_row()
    row.update(change)
    with pytest.raises(ValueError, match=message):
        validate_row(row)


def test_rows_that_did_not_run_need_only_a_reason() -> None:
    for status in STATUSES:
        if status not in ("ok", "mismatch"):
            validate_row(skipped_row("moe", 80, "regional", "why") | {"status": status})
    assert set(empty_row("llama", 2, "inductor")) == set(ROW_FIELDS)
    with pytest.raises(ValueError, match="must be an object"):
        validate_row([])


def test_document_validation() -> None:
    doc = {"schema_version": SCHEMA_VERSION, "created": "now", "machine": {}, "config": {}, "wall_s": 1.0,
           "rows": [valid_row(), skipped_row("moe", 8, "inductor", "timed out at 2 layers")], "ratios": []}
    validate_results(doc)
    with pytest.raises(ValueError, match="ratio"):
        validate_results({**doc, "ratios": [{"key": "x"}]})
    with pytest.raises(ValueError, match="ratios"):
        validate_results({**doc, "ratios": {}})
    with pytest.raises(ValueError, match="schema_version"):
        validate_results({**doc, "schema_version": 99})
    with pytest.raises(ValueError, match="lacks"):
        validate_results({k: v for k, v in doc.items() if k != "machine"})
    with pytest.raises(ValueError, match="'rows' must be a list"):
        validate_results({**doc, "rows": {}})
