"""The fleet bench's table: every row printed, a failed row says why; the worker's options.
(Its launches are exercised for real by tests/backend/test_shared_cache.py.)"""

from __future__ import annotations

import argparse

import pytest

from layerpass.bench import fleet
from layerpass.bench.fleet import Launch, _override, _row, markdown


def rank(compiled: int, loaded: int, waited: int, cpu: float = 10.0) -> dict:
    return {"pieces": {"compiled": compiled, "loaded": loaded, "waited": waited}, "cpu_s": cpu, "dynamo_s": 0.5,
            "warm_start": "loaded"}


def test_rows_sum_over_ranks_and_a_failed_row_keeps_the_table_whole():
    rows = [_row("A: cold TP=2, shared cache dir", Launch([rank(2, 0, 0, 12.0), rank(0, 0, 2, 3.0)], 20.0)),
            _row("B: first call TP=2, via Redis", None, "rank 1 of 2 exceeded 900 s"),
            {"row": "B: first call TP=2, via bundle", "status": "skipped: no redis-server on PATH"}]
    assert rows[0]["compiled"] == 2 and rows[0]["waited"] == 2 and rows[0]["cpu_s"] == 15.0
    table = markdown(rows, "Fleet").splitlines()
    assert len([ln for ln in table if ln.startswith("| A") or ln.startswith("| B")]) == 3
    assert "| A: cold TP=2, shared cache dir | ok | 20.0 | 15.0 | 2 | 0 | 2 | 1.0 | loaded |" in table
    assert any("failed: rank 1 of 2 exceeded 900 s" in ln for ln in table)
    assert any("skipped: no redis-server" in ln for ln in table)


def test_a_launch_that_raises_becomes_a_failed_row():
    rows: list[dict] = []

    def boom() -> Launch:
        raise RuntimeError("cache export failed: no saved program")

    assert fleet._measure(rows, "B: via bundle", boom) is None
    assert rows == [{"row": "B: via bundle", "status": "failed: cache export failed: no saved program"}]


def test_worker_overrides_are_config_fields_with_ints():
    assert _override("num_kv_heads=4") == ("num_kv_heads", 4)
    for bad in ["num_kv_heads", "x=four", "=3"]:
        with pytest.raises(argparse.ArgumentTypeError, match="FIELD=INT"):
            _override(bad)
    args = fleet.worker_args("llama", 4, rank=1, world=2, init_file="/tmp/i", overrides={"num_kv_heads": 4})
    assert args[args.index("--set"):args.index("--set") + 2] == ["--set", "num_kv_heads=4"] and "--init-file" in args
