"""The dataset report: readable text (table, problems, totals) and a JSON round trip."""

from __future__ import annotations

from bucketing.buckets import Bucket
from bucketing.report import DatasetReport, bucket_counts, format_report


def test_text_report_has_table_problems_notes_and_totals():
    report = DatasetReport(problems=[("/d/a.png", "empty file (0 bytes)")], notes=[("/d/b.png", "converted")],
                           totals={"rows": 2, "images": 1})
    text = format_report(report, (Bucket(64, 64), Bucket(64, 128)), {(64, 64): 1})
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["bucket", "(h"] and "1 of 2 buckets used, 1 images" in lines
    assert "skipped 1 file(s):" in lines and "  /d/a.png: empty file (0 bytes)" in lines
    assert "notes (1):" in lines and "  /d/b.png: converted" in lines
    assert lines[-1] == "rows: 2, images: 1"


def test_long_lists_are_cut_in_text_but_kept_in_json():
    report = DatasetReport(problems=[(f"{i}.png", "not an image") for i in range(60)])
    text = format_report(report, (Bucket(64, 64),), {})
    assert "  49.png: not an image" in text and "50.png" not in text and "... and 10 more in report.json" in text
    again = DatasetReport.from_json(report.to_json())
    assert again == report and len(again.problems) == 60


def test_bucket_counts_count_flipped_twins_once():
    rows = [{"bucket": [64, 64], "flip": False}, {"bucket": [64, 64], "flip": True},
            {"bucket": [64, 128], "flip": False}]
    assert bucket_counts(rows) == {(64, 64): 1, (64, 128): 1}
