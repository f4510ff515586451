"""The dataset report: what was skipped and why, what was converted, and the bucket plan, at a glance."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from bucketing.buckets import Bucket, format_bucket_table

# Longer lists are cut in the text report (report.json keeps them all).
SHOWN_PROBLEMS = 50
SHOWN_NOTES = 20


@dataclass
class DatasetReport:
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): skipped
    notes: list[tuple[str, str]] = field(default_factory=list)  # (path, note): kept, with what was done
    totals: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> DatasetReport:
        data = json.loads(text)
        return cls([tuple(p) for p in data.get("problems", [])], [tuple(n) for n in data.get("notes", [])],
                   dict(data.get("totals", {})))


def bucket_counts(rows) -> Counter:
    """Images per bucket (h, w) from manifest rows or a manifest dataset; flipped twins count once."""
    buckets, flips = (rows["bucket"], rows["flip"]) if hasattr(rows, "column_names") else \
        ([r["bucket"] for r in rows], [r["flip"] for r in rows])
    return Counter(tuple(b) for b, flip in zip(buckets, flips) if not flip)


def format_report(report: DatasetReport, buckets: Sequence[Bucket], counts: Mapping) -> str:
    """Bucket table, then skipped files with reasons, then notes, then totals (one line)."""
    lines = [format_bucket_table(buckets, counts)]
    lines += _section(f"skipped {len(report.problems)} file(s):", report.problems, SHOWN_PROBLEMS)
    lines += _section(f"notes ({len(report.notes)}):", report.notes, SHOWN_NOTES)
    if report.totals:
        lines.append("\n" + ", ".join(f"{k}: {v}" for k, v in report.totals.items()))
    return "\n".join(lines)


def _section(title: str, entries: list[tuple[str, str]], shown: int) -> list[str]:
    if not entries:
        return []
    lines = ["\n" + title]
    lines += [f"  {path}: {text}" for path, text in entries[:shown]]
    if len(entries) > shown:
        lines.append(f"  ... and {len(entries) - shown} more in report.json")
    return lines
