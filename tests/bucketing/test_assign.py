"""Resize, crop and flip of one image against an independent calculation (exact fractions)."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest

from bucketing.assign import Assignment, add_time_ids, assign, resized_size
from bucketing.buckets import Bucket, make_buckets, nearest_bucket

BUCKETS = make_buckets(1024)


def expected_resize(original, bucket):
    """Exact scale as a fraction; each side rounded half up, then never below the bucket's."""
    (h, w), (bh, bw) = original, bucket
    scale = max(Fraction(bh, h), Fraction(bw, w))
    return (max(bh, int(h * scale + Fraction(1, 2))), max(bw, int(w * scale + Fraction(1, 2))))


SIZES = [(3000, 2000), (600, 400), (1000, 1000), (400, 1900), (1080, 1920), (77, 1333), (4032, 3024), (1, 1)]


@pytest.mark.parametrize("original", SIZES)
def test_resize_covers_the_bucket_and_the_crop_is_centred(original):
    a = assign(original, BUCKETS)
    bh, bw = a.bucket.size
    assert a.bucket == nearest_bucket(*original, BUCKETS)
    assert a.resized_size == expected_resize(original, (bh, bw))
    assert a.resized_size[0] >= bh and a.resized_size[1] >= bw
    assert (a.crop_top, a.crop_left) == ((a.resized_size[0] - bh) // 2, (a.resized_size[1] - bw) // 2)
    assert a.flip is False and a.crop_top_left == (a.crop_top, a.crop_left)


def test_one_side_fits_exactly_and_small_images_are_upscaled():
    assert resized_size((768, 1536), Bucket(512, 1024)) == (512, 1024)
    assert resized_size((100, 100), (1024, 1024)) == (1024, 1024)
    assert resized_size((300, 700), [512, 1024]) == (512, 1195)  # the other side covers: 700 * 512/300 = 1194.7
    a = assign((10, 20), BUCKETS)  # 10x20 is kept and scaled x70.4 into the 704x1408 bucket
    assert a.bucket == Bucket(704, 1408) and a.resized_size == (704, 1408) and a.crop_top_left == (0, 0)


def test_random_crop_is_reproducible_in_range_and_varies():
    original = (900, 2000)
    crops = set()
    for seed in range(30):
        a = assign(original, BUCKETS, "random", rng=random.Random(seed))
        assert a == assign(original, BUCKETS, "random", rng=random.Random(seed))
        assert 0 <= a.crop_top <= a.resized_size[0] - a.bucket.height
        assert 0 <= a.crop_left <= a.resized_size[1] - a.bucket.width
        crops.add(a.crop_top_left)
    assert len(crops) > 5


def test_flip_mirrors_crop_left():
    for crop in ("center", "random"):
        plain = assign((900, 2000), BUCKETS, crop, rng=random.Random(5))
        flipped = assign((900, 2000), BUCKETS, crop, flip=True, rng=random.Random(5))
        assert flipped.flip and flipped.crop_top == plain.crop_top
        assert flipped.crop_left == plain.resized_size[1] - plain.bucket.width - plain.crop_left
    # kohya's example: a 10-pixel margin on the left becomes the margin on the right
    a = assign((100, 120), [Bucket(100, 100)], "random", flip=True, rng=FixedRng(10))
    assert a == Assignment(Bucket(100, 100), (100, 120), 0, 10, True)  # crop_left 10 -> 120 - 100 - 10 = 10
    b = assign((100, 130), [Bucket(100, 100)], "random", flip=True, rng=FixedRng(5))
    assert b.crop_left == 130 - 100 - 5


class FixedRng(random.Random):
    def __init__(self, value):
        super().__init__(0)
        self.value = value

    def randint(self, a, b):
        return min(max(a, self.value), b)


def test_bad_crop_modes_are_refused():
    with pytest.raises(ValueError, match="center' or 'random"):
        assign((10, 10), BUCKETS, "top")
    with pytest.raises(ValueError, match="need an rng"):
        assign((10, 10), BUCKETS, "random")


def test_add_time_ids_order():
    assert add_time_ids((1080, 1920), (12, 34), (768, 1344)) == [1080, 1920, 12, 34, 768, 1344]
    a = assign((1080, 1920), BUCKETS, flip=True)
    assert add_time_ids((1080, 1920), a.crop_top_left, a.bucket.size) == [1080, 1920, a.crop_top, a.crop_left,
                                                                          a.bucket.height, a.bucket.width]
