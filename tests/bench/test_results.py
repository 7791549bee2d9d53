"""``bench/results.py``: the document a sweep starts from, and writing it (JSON and Markdown, atomically)."""

from __future__ import annotations

import json

from layerpass.bench.config import SweepConfig
from layerpass.bench.results import machine_info, new_document, write_results
from layerpass.bench.schema import DOC_FIELDS, validate_results
from layerpass.bench.summary import markdown_table
from tests.bench.fakes import valid_row


def test_a_new_document_is_valid_and_records_the_run() -> None:
    doc = new_document(SweepConfig(preset="quick", command="layerpass bench --quick"))
    assert tuple(doc) == DOC_FIELDS and doc["rows"] == [] and doc["ratios"] == []
    validate_results(doc)
    assert doc["config"]["command"] == "layerpass bench --quick" and doc["created"].endswith("+00:00")
    assert {"cpu", "cpu_count", "torch", "layerpass", "loadavg_start"} <= set(machine_info())


def test_both_files_are_written_whole(tmp_path) -> None:
    doc = new_document(SweepConfig(preset="quick"))
    doc["rows"] = [valid_row()]
    path = write_results(doc, str(tmp_path / "out"))
    assert path == str(tmp_path / "out" / "results.json")
    assert json.load(open(path)) == json.loads(json.dumps(doc))
    assert (tmp_path / "out" / "results.md").read_text() == markdown_table(doc) + "\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.json", "results.md"]  # no .tmp left
