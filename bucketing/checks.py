"""Plan checks: what a bucket plan costs the images (pixels cropped away, aspects forced into one bucket)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from bucketing.assign import resized_size

CROP_WARN_SHARE = 0.2  # warn when the crop cuts more than this share of an image's (resized) area
CROWDED_SHARE = 0.5  # ... or when more than this share of the images land in one bucket
ASPECT_SPREAD = 1.25  # ... while their aspect ratios differ by more than this factor
SHOWN = 5  # files named per warning


def cropped_share(original_size: Sequence[int], bucket: Sequence[int]) -> float:
    """Share of the image's area (after the resize that covers the bucket) cut away by the crop, in [0, 1)."""
    rh, rw = resized_size(tuple(original_size), tuple(bucket))
    return 1.0 - (bucket[0] * bucket[1]) / (rh * rw)


def plan_warnings(rows: Sequence[dict]) -> list[str]:
    """Warnings about a plan, one line each, naming the worst files; rows are manifest rows (flipped twins
    are skipped: they lose what their original loses).

    Two traps: sides or aspect limits that leave no bucket near an image's shape (a 1000x250 panorama
    cropped to a square loses 75 %), and a plan where most images share one bucket though their
    shapes differ (bucketing silently off).
    """
    plain = [r for r in rows if not r["flip"]]
    warnings = []
    lost = sorted(((cropped_share(r["original_size"], r["bucket"]), r) for r in plain), key=lambda x: -x[0])
    heavy = [(share, r) for share, r in lost if share > CROP_WARN_SHARE]
    if heavy:
        worst = ", ".join(f"{_where(r)} ({share:.0%} cut to {_size(r['bucket'])})" for share, r in heavy[:SHOWN])
        more = f" and {len(heavy) - SHOWN} more" if len(heavy) > SHOWN else ""
        warnings.append(f"the crop cuts more than {CROP_WARN_SHARE:.0%} of the area of {len(heavy)} of {len(plain)} "
                        f"image(s): {worst}{more}. No bucket is near their shape: widen dataset.min_side/max_side "
                        "or max_aspect (unset min_side/max_side follow the resolution)")
    warnings += _crowded(plain)
    return warnings


def _crowded(plain: Sequence[dict]) -> list[str]:
    by_bucket = Counter((r.get("resolution"), tuple(r["bucket"])) for r in plain)
    if len(plain) < 4 or not by_bucket:
        return []
    (resolution, bucket), count = by_bucket.most_common(1)[0]
    inside = [r for r in plain if (r.get("resolution"), tuple(r["bucket"])) == (resolution, bucket)]
    aspects = [r["original_size"][1] / r["original_size"][0] for r in inside]
    if count / len(plain) <= CROWDED_SHARE or max(aspects) / min(aspects) <= ASPECT_SPREAD:
        return []
    target = math.log(bucket[1] / bucket[0])
    inside.sort(key=lambda r: -abs(math.log(r["original_size"][1] / r["original_size"][0]) - target))
    names = ", ".join(f"{_where(r)} ({_size(r['original_size'])})" for r in inside[:SHOWN])
    return [f"{count} of {len(plain)} images ({count / len(plain):.0%}) share bucket {_size(bucket)} though their "
            f"aspect ratios range {min(aspects):.2f}..{max(aspects):.2f}; least alike: {names}. The plan has "
            "too few buckets: widen dataset.min_side/max_side or max_aspect"]


def upscaled_rows(rows: Sequence[dict]) -> list[tuple[str, str]]:
    """(path, "h x w -> bucket") of each image the resize enlarges (kept: size conditioning tells SDXL)."""
    return [(_where(r), f"upscaled {_size(r['original_size'])} -> {_size(r['bucket'])}")
            for r in rows if not r["flip"] and (r["bucket"][0] > r["original_size"][0]
                                                or r["bucket"][1] > r["original_size"][1])]


def _where(row: dict) -> str:
    root = row.get("root")
    return f"{root}/{row['path']}" if root else row["path"]


def _size(hw: Sequence[int]) -> str:
    return f"{hw[0]}x{hw[1]}"
