"""Crop overlay geometry: the manifest's crop mapped back onto the original image."""

from __future__ import annotations

import pytest
from PIL import Image

from bucketing.assign import assign
from bucketing.buckets import make_buckets
from conftest import make_image
from finetune.studio.thumbs import crop_box, cropped_percent, draw_crop, thumbnail


def test_wide_image_on_a_square_plan_keeps_the_centre_quarter():
    # 4:1 (h 64, w 256) into the only bucket, 128x128: scaled x2 to 128x512, 384 px cut, 192 each side.
    box = crop_box((64, 256), (128, 128), (0, 192))
    assert box == pytest.approx((0, 96, 64, 160))
    assert cropped_percent((64, 256), (128, 128), (0, 192)) == pytest.approx(75.0)


def test_flipped_row_is_mirrored_back():
    # A flipped row's crop_left is in the mirrored image: left' = resized_w - bucket_w - left.
    plain = crop_box((64, 256), (128, 128), (0, 100))
    flipped = crop_box((64, 256), (128, 128), (0, 512 - 128 - 100), flip=True)
    assert flipped == pytest.approx(plain)


@pytest.mark.parametrize("size", [(100, 150), (150, 100), (333, 517), (64, 64)])
def test_box_matches_an_independent_assignment(size):
    buckets = make_buckets(128, 64, 64, 256, 4.0)
    a = assign(size, buckets, "center")
    top, left, bottom, right = crop_box(size, a.bucket.size, a.crop_top_left)
    scale = a.resized_size[1] / size[1]
    assert right - left == pytest.approx(a.bucket.width / scale, rel=0.02)
    assert bottom - top == pytest.approx(a.bucket.height / (a.resized_size[0] / size[0]), rel=0.02)
    assert 0 <= top and 0 <= left and bottom <= size[0] + 1e-6 and right <= size[1] + 1e-6


def test_thumbnail_shades_what_is_cut_and_is_cached(tmp_path):
    path = make_image(tmp_path / "wide.png", 64, 256, color=(240, 240, 240))
    row = {"original_size": [64, 256], "bucket": [128, 128], "crop_top_left": [0, 192], "flip": False,
           "fingerprint": "f1"}
    image = draw_crop(path, row)
    assert image.size == (256, 64)
    assert sum(image.getpixel((10, 40))) < sum(image.getpixel((128, 40))) - 150  # cut away: darker
    cache = tmp_path / "cache"
    first = thumbnail(path, row, cache)
    assert first.parent == cache and thumbnail(path, row, cache) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "wide.png"]  # nothing beside the image
    assert Image.open(first).size == (256, 64)
