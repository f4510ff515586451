"""Aspect-ratio buckets: generated from a pixel budget, never hard-coded."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Bucket:
    height: int
    width: int

    @property
    def aspect(self) -> float:
        """width / height."""
        return self.width / self.height

    @property
    def size(self) -> tuple[int, int]:
        return (self.height, self.width)


def make_buckets(resolution: int, step: int = 64, min_side: int = 512, max_side: int = 2048,
                 max_aspect: float = 4.0) -> tuple[Bucket, ...]:
    """For each height (multiple of `step`), the widest width (multiple of `step`) within resolution².

    Both sides stay within [min_side, max_side] and the aspect ratio within [1/max_aspect, max_aspect].
    The result is sorted by aspect ratio (portrait first) and is the same for the same arguments.
    """
    budget = resolution * resolution
    buckets = set()
    height = _round_up(min_side, step)
    while height <= max_side:
        width = min(max_side, (budget // height) // step * step)
        if width >= min_side and 1 / max_aspect <= width / height <= max_aspect:
            buckets.add(Bucket(height, width))
        height += step
    if not buckets:
        raise ValueError(f"no bucket fits resolution {resolution} with sides in [{min_side}, {max_side}] "
                         f"(step {step}, max aspect {max_aspect}): widen min_side/max_side")
    return tuple(sorted(buckets, key=lambda b: (b.aspect, b.height)))


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def nearest_bucket(height: int, width: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest in log space (ties: the larger bucket)."""
    target = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b.aspect) - target), -b.height * b.width))


def format_bucket_table(buckets: Sequence[Bucket], counts: Mapping) -> str:
    """The plan as a table: bucket, aspect ratio, image count (counts keyed by Bucket or (h, w))."""
    lines = [f"{'bucket (h x w)':>16}  {'aspect':>6}  {'images':>6}"]
    total = 0
    for bucket in buckets:
        count = counts.get(bucket, counts.get(bucket.size, 0))
        if count:
            lines.append(f"{bucket.height:>7} x {bucket.width:<6}  {bucket.aspect:>6.2f}  {count:>6}")
            total += count
    used = sum(1 for b in buckets if counts.get(b, counts.get(b.size, 0)))
    lines.append(f"{used} of {len(buckets)} buckets used, {total} images")
    return "\n".join(lines)
