"""``python -m layerpass.bench.compile_time``: a cell that fails or times out keeps its row; the table is complete."""

from __future__ import annotations

import json

from layerpass.bench import compile_time
from layerpass.bench.runner import FreshRunError

OK = {"layers": 2, "switch": "on", "pieces": 2, "unique": 2, "compiled": 2, "cache_hits": 0, "dynamo_s": 0.7,
      "compile_s": 4.2, "total_s": 4.9, "first_call_s": 5.5, "process_s": 9.0, "max_err": 0.0}


def test_a_failed_cell_is_dashes_with_its_reason_under_the_table() -> None:
    table = compile_time.format_table([OK, {"layers": 80, "switch": "off", "error": "llama at 80 layers (switch off) "
                                                                                  "exceeded 1800 s"}])
    header, rule, ok, failed, note = table.splitlines()
    assert ok.split() == ["2", "on", "2", "2", "2", "0.70", "4.20", "4.90", "5.50", "9.00", "0.0e+00"]
    assert failed.split() == ["80", "off"] + ["-"] * 9 and len(failed) == len(ok) == len(header) == len(rule)
    assert note == "llama at 80 layers (switch off) exceeded 1800 s"


def test_every_cell_is_in_the_table_when_one_times_out(monkeypatch, capsys, tmp_path) -> None:
    def fake_run_cold(args, *, use_layername, timeout_s, what):
        if "80" in args:
            raise FreshRunError(f"{what} exceeded {timeout_s:.0f} s")
        return {**OK, "switch": "on" if use_layername else "off"}, 9.0

    monkeypatch.setattr(compile_time, "run_cold", fake_run_cold)
    out = tmp_path / "rows.json"
    assert compile_time.main(["--layers", "2", "80", "--timeout", "5", "--json", str(out)]) == 1
    rows = json.loads(out.read_text())
    assert [(r["layers"], r["switch"], r.get("error")) for r in rows] == [
        (2, "on", None), (2, "off", None), (80, "on", "llama at 80 layers (switch on) exceeded 5 s"),
        (80, "off", "llama at 80 layers (switch off) exceeded 5 s")]
    assert capsys.readouterr().out.count("\n") == 1 + 2 + 4 + 2  # title, header + rule, 4 cells, 2 reasons
