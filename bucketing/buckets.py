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


def make_buckets(resolution: int, step: int = 64, min_side: int | None = None, max_side: int | None = None,
                 max_aspect: float = 4.0) -> tuple[Bucket, ...]:
    """For each height (multiple of `step`), the widest width (multiple of `step`) within resolution².

    Unset `min_side`/`max_side` follow the budget (`derived_sides`: 512..2048 at 1024).

    The width is also bounded by `max_side` and by `max_aspect` × height; a bucket whose sides fall
    outside [min_side, max_side] or whose aspect is under 1/max_aspect is left out. Each bucket's
    transpose is added, so both orientations exist. Buckets of equal aspect ratio keep only the
    largest (a smaller one could never be nearest). Sorted portrait first; deterministic.

    Raises:
        ValueError: non-positive arguments, or no bucket fits.
    """
    if min_side is None or max_side is None:
        low, high = derived_sides(resolution, step) if resolution > 0 and step > 0 else (0, 0)
        min_side, max_side = min_side or low, max_side or high
    if min(resolution, step, min_side, max_side) <= 0 or max_aspect < 1:
        raise ValueError(f"make_buckets: resolution {resolution}, step {step}, min_side {min_side}, "
                         f"max_side {max_side} must be positive and max_aspect {max_aspect} at least 1")
    budget = resolution * resolution
    largest: dict[tuple[int, int], Bucket] = {}  # reduced aspect ratio -> largest bucket with it
    for height in range(_round_up(min_side, step), max_side + 1, step):
        width_limit = min(budget // height, max_side, math.floor(max_aspect * height))
        width = width_limit // step * step
        if width < min_side or width * max_aspect < height:
            continue
        for bucket in (Bucket(height, width), Bucket(width, height)):
            ratio = math.gcd(bucket.height, bucket.width)
            key = (bucket.height // ratio, bucket.width // ratio)
            if key not in largest or bucket.height > largest[key].height:
                largest[key] = bucket
    if not largest:
        raise ValueError(f"no bucket fits resolution {resolution} with sides in [{min_side}, {max_side}] "
                         f"(step {step}, max aspect {max_aspect}): widen min_side/max_side")
    return tuple(sorted(largest.values(), key=lambda b: (b.aspect, b.height)))


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def derived_sides(resolution: int, step: int = 64) -> tuple[int, int]:
    """Bucket side limits that follow the pixel budget: half and twice `resolution`, on the step grid.

    At 1024 this is the SDXL paper's 512..2048. Fixed limits break other budgets: with min_side 512
    at resolution 512 the only bucket is 512x512, so every non-square image loses pixels to the crop.
    """
    if resolution <= 0 or step <= 0:
        raise ValueError(f"derived_sides: resolution {resolution} and step {step} must be positive")
    return max(step, _round_up(resolution // 2, step)), max(step, resolution * 2 // step * step)


def nearest_bucket(height: int, width: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest in log space (ties: the larger bucket, then the taller)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"nearest_bucket: image size must be positive, got (h, w) = ({height}, {width})")
    if not buckets:
        raise ValueError("nearest_bucket: no buckets to choose from")
    target = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b.aspect) - target), -b.height * b.width, -b.height))


def format_bucket_table(buckets: Sequence[Bucket], counts: Mapping) -> str:
    """The plan as a table: bucket, aspect ratio, image count (counts keyed by Bucket or (h, w)).

    Only buckets with images are listed; the last line says how many of the planned buckets are used.
    """
    def count_of(bucket: Bucket) -> int:
        return int(counts.get(bucket, counts.get(bucket.size, 0)))

    lines = [f"{'bucket (h x w)':>16}  {'aspect':>6}  {'images':>6}"]
    used = [b for b in buckets if count_of(b)]
    for bucket in used:
        lines.append(f"{bucket.height:>7} x {bucket.width:<6}  {bucket.aspect:>6.2f}  {count_of(bucket):>6}")
    total = sum(count_of(b) for b in used)
    lines.append(f"{len(used)} of {len(buckets)} buckets used, {total} images")
    return "\n".join(lines)
