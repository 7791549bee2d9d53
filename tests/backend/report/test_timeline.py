"""The timeline (``backend/report/timeline.py``): spans recorded only while a timeline is being recorded,
on its clock, and printed by start time. A compile's timeline, cold and warm: ``test_warm_start.py``."""

from __future__ import annotations

import time

from layerpass.backend.report.timeline import Timeline, add_span, as_records, format_timeline, span


def test_spans_are_recorded_only_while_recording() -> None:
    with span("nobody listens"):  # no timeline: nothing happens, nothing fails
        pass
    origin = time.perf_counter()
    timeline = Timeline(origin)
    with timeline:
        with span("outer"):
            with span("inner"):
                time.sleep(0.01)
        add_span("from another thread", origin + 1.0, origin + 1.5)
    with span("after"):
        pass
    assert [s.what for s in timeline.spans] == ["inner", "outer", "from another thread"]
    inner, outer, other = timeline.spans
    assert 0 <= outer.start_s <= inner.start_s < inner.end_s <= outer.end_s
    assert inner.duration_s >= 0.01
    assert (other.start_s, other.end_s) == (1.0, 1.5)


def test_records_and_text_are_by_start_time_parents_first() -> None:
    timeline = Timeline(0.0)
    timeline.add("child", 1.0, 2.0)
    timeline.add("parent", 1.0, 3.0)
    timeline.add("first", 0.0, 0.5)
    records = as_records(timeline.spans)
    assert [r["what"] for r in records] == ["first", "parent", "child"]
    assert records[1] == {"what": "parent", "start_s": 1.0, "end_s": 3.0, "duration_s": 2.0}
    lines = format_timeline(timeline.spans).splitlines()
    assert len(lines) == 3 and lines[1].endswith("parent") and "(  2.00 s)" in lines[1]
