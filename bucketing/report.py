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
    warnings: list[str] = field(default_factory=list)  # plan problems worth a look (checks.plan_warnings)
    upscaled: list[tuple[str, str]] = field(default_factory=list)  # (path, "h x w -> bucket")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> DatasetReport:
        data = json.loads(text)
        return cls([tuple(p) for p in data.get("problems", [])], [tuple(n) for n in data.get("notes", [])],
                   dict(data.get("totals", {})), list(data.get("warnings", [])),
                   [tuple(u) for u in data.get("upscaled", [])])


def bucket_counts(rows, resolution: int | None = None) -> Counter:
    """Images per bucket (h, w) from manifest rows or a manifest dataset; flipped twins count once.

    With `resolution`, only the rows planned at that pixel budget.
    """
    columns = rows.column_names if hasattr(rows, "column_names") else (rows[0].keys() if rows else ())
    get = (lambda c: rows[c]) if hasattr(rows, "column_names") else (lambda c: [r[c] for r in rows])
    budgets = get("resolution") if "resolution" in columns else [None] * len(get("flip"))
    return Counter(tuple(b) for b, flip, res in zip(get("bucket"), get("flip"), budgets)
                   if not flip and (resolution is None or res == resolution))


def format_report(report: DatasetReport, buckets: Sequence[Bucket] | Mapping[int, Sequence[Bucket]],
                  counts: Mapping) -> str:
    """Bucket table (one per budget when `buckets` maps budget -> buckets and `counts` budget -> counts),
    skipped files with reasons, notes, upscaled images, warnings, then totals (one line)."""
    if isinstance(buckets, Mapping):
        lines = []
        for resolution, planned in buckets.items():
            lines += [f"resolution {resolution} (~{resolution}x{resolution} pixels):",
                      format_bucket_table(planned, counts.get(resolution, {})), ""]
        lines = lines[:-1]
    else:
        lines = [format_bucket_table(buckets, counts)]
    lines += _section(f"skipped {len(report.problems)} file(s):", report.problems, SHOWN_PROBLEMS)
    lines += _section(f"notes ({len(report.notes)}):", report.notes, SHOWN_NOTES)
    lines += _section(f"upscaled {len(report.upscaled)} image(s) to their bucket (kept; size conditioning "
                      "tells SDXL):", report.upscaled, SHOWN_NOTES)
    if report.totals:
        lines.append("\n" + ", ".join(f"{k}: {v}" for k, v in report.totals.items()))
    lines += [f"warning: {w}" for w in report.warnings]
    return "\n".join(lines)


def _section(title: str, entries: list[tuple[str, str]], shown: int) -> list[str]:
    if not entries:
        return []
    lines = ["\n" + title]
    lines += [f"  {path}: {text}" for path, text in entries[:shown]]
    if len(entries) > shown:
        lines.append(f"  ... and {len(entries) - shown} more in report.json")
    return lines
