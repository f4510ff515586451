"""The dataset report: what was skipped and why, what was converted, and the bucket plan, at a glance."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from bucketing.buckets import Bucket, format_bucket_table


@dataclass
class DatasetReport:
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): skipped
    notes: list[tuple[str, str]] = field(default_factory=list)  # (path, note): kept, with what was done
    totals: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)


def format_report(report: DatasetReport, buckets: Sequence[Bucket], counts: Mapping) -> str:
    """Bucket table, then skipped files with reasons, then notes, then totals."""
    lines = [format_bucket_table(buckets, counts)]
    if report.problems:
        lines.append(f"\nskipped {len(report.problems)} file(s):")
        lines.extend(f"  {path}: {reason}" for path, reason in report.problems)
    if report.notes:
        lines.append(f"\nnotes ({len(report.notes)}):")
        lines.extend(f"  {path}: {note}" for path, note in report.notes[:50])
        if len(report.notes) > 50:
            lines.append(f"  ... and {len(report.notes) - 50} more in report.json")
    lines.append("\n" + ", ".join(f"{k}: {v}" for k, v in report.totals.items()))
    return "\n".join(lines)
