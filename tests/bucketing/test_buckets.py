"""Bucket plan against a brute-force enumeration; nearest bucket in log space; the printed table."""

from __future__ import annotations

import math

import pytest

from bucketing.buckets import Bucket, format_bucket_table, make_buckets, nearest_bucket


def brute_force(resolution, step, min_side, max_side, max_aspect):
    """Every grid size within the limits that is the widest for its height or the tallest for its
    width; of equal aspect ratios the largest."""
    sides = [s for s in range(step, max_side + 1, step) if s >= min_side]
    fits = {(h, w) for h in sides for w in sides
            if h * w <= resolution ** 2 and 1 / max_aspect <= w / h <= max_aspect}
    widest = {(h, max(w for hh, w in fits if hh == h)) for h, _ in fits}
    tallest = {(max(h for h, ww in fits if ww == w), w) for _, w in fits}
    candidates = widest | tallest
    best = {}
    for h, w in candidates:
        g = math.gcd(h, w)
        key = (h // g, w // g)
        if key not in best or h > best[key][0]:
            best[key] = (h, w)
    return set(best.values())


@pytest.mark.parametrize("args", [(1024, 64, 512, 2048, 4.0), (1024, 64, 512, 2048, 2.0), (768, 64, 256, 1536, 4.0),
                                  (512, 32, 256, 1024, 3.0), (256, 64, 128, 512, 4.0)])
def test_plan_matches_brute_force(args):
    buckets = make_buckets(*args)
    assert {b.size for b in buckets} == brute_force(*args)
    resolution, step, min_side, max_side, max_aspect = args
    for b in buckets:
        assert b.height % step == 0 and b.width % step == 0 and b.height * b.width <= resolution ** 2
        assert min_side <= min(b.size) and max(b.size) <= max_side and 1 / max_aspect <= b.aspect <= max_aspect
        assert Bucket(b.width, b.height) in buckets  # both orientations
    assert list(buckets) == sorted(buckets, key=lambda b: (b.aspect, b.height))
    assert make_buckets(*args) == buckets  # deterministic


def test_sdxl_plan_holds_the_papers_buckets():
    buckets = make_buckets(1024)
    for size in [(1024, 1024), (896, 1152), (832, 1216), (768, 1344), (640, 1536), (576, 1728), (512, 2048)]:
        assert Bucket(*size) in buckets and Bucket(*size[::-1]) in buckets
    assert max(b.aspect for b in buckets) == 4.0


def test_max_aspect_clamps_the_width_instead_of_dropping_the_height():
    buckets = make_buckets(1024, max_aspect=2.0)
    assert Bucket(704, 1408) in buckets and max(b.aspect for b in buckets) == 2.0
    assert Bucket(512, 1024) not in buckets  # same aspect as 704x1408, smaller: never nearest


def test_impossible_plans_are_refused():
    with pytest.raises(ValueError, match="no bucket fits"):
        make_buckets(256, min_side=512)
    with pytest.raises(ValueError, match="must be positive"):
        make_buckets(1024, step=0)


def test_nearest_bucket_in_log_space():
    buckets = make_buckets(1024)
    for h, w in [(3000, 2000), (1000, 4000), (512, 512), (719, 1280), (5000, 100), (100, 5000)]:
        chosen = nearest_bucket(h, w, buckets)
        distances = [abs(math.log(b.aspect) - math.log(w / h)) for b in buckets]
        assert abs(math.log(chosen.aspect) - math.log(w / h)) == min(distances)
    # log space: an image of aspect 1.5 sits nearer 2.0 than 1.0 (|ln 1.5 - ln 2| < ln 1.5), not linearly
    assert nearest_bucket(100, 150, [Bucket(64, 64), Bucket(64, 128)]) == Bucket(64, 128)
    assert nearest_bucket(100, 141, [Bucket(64, 64), Bucket(64, 128)]) == Bucket(64, 64)


def test_nearest_bucket_ties_do_not_depend_on_order():
    pair = [Bucket(512, 1024), Bucket(1024, 512)]
    assert nearest_bucket(700, 700, pair) == nearest_bucket(700, 700, pair[::-1]) == Bucket(1024, 512)
    with pytest.raises(ValueError, match="positive"):
        nearest_bucket(0, 10, pair)


def test_bucket_table_lists_used_buckets_with_counts():
    buckets = (Bucket(64, 128), Bucket(128, 128), Bucket(128, 64))
    table = format_bucket_table(buckets, {Bucket(64, 128): 3, (128, 64): 1})
    lines = table.splitlines()
    assert lines[0].split() == ["bucket", "(h", "x", "w)", "aspect", "images"]
    assert lines[1].split() == ["64", "x", "128", "2.00", "3"] and lines[2].split() == ["128", "x", "64", "0.50", "1"]
    assert lines[-1] == "2 of 3 buckets used, 4 images"
