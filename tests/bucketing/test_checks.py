"""Issue L's traps: bucket sides that ignore the budget, crops that eat images, one bucket for all shapes."""

from __future__ import annotations

import pytest

from bucketing.buckets import Bucket, derived_sides, make_buckets
from bucketing.checks import cropped_share, plan_warnings
from bucketing.manifest import BuildOptions, SubsetSpec, build_manifest
from bucketing.report import format_report
from conftest import make_image


def test_bucket_sides_follow_the_budget():
    assert derived_sides(1024) == (512, 2048)  # the SDXL paper's range
    assert derived_sides(512) == (256, 1024) and derived_sides(256) == (128, 512)
    assert derived_sides(800) == (448, 1600)  # on the 64 grid
    # Old code: min_side = 512 at a 512² budget left only 512x512, so bucketing was silently off.
    assert len(make_buckets(512)) > 1 and Bucket(256, 1024) in make_buckets(512)
    assert Bucket(128, 512) in make_buckets(256)  # old code: "no bucket fits"
    assert make_buckets(1024) == make_buckets(1024, min_side=512, max_side=2048)


def test_a_panorama_keeps_its_pixels_at_512(tmp_path):
    folder = tmp_path / "pano"
    make_image(folder / "pano.png", 250, 1000)
    result = build_manifest([SubsetSpec(folder=folder)], BuildOptions(resolution=512), tmp_path / "work")
    row = result.dataset[0]
    assert row["bucket"] == [256, 1024] and cropped_share(row["original_size"], row["bucket"]) < 0.05
    assert result.report.warnings == []


def test_a_crop_that_eats_the_image_is_named(tmp_path):
    folder = tmp_path / "pano"
    make_image(folder / "pano.png", 250, 1000)
    make_image(folder / "square.png", 300, 300)
    options = BuildOptions(resolution=512, min_side=512, max_side=2048)  # the old fixed sides
    result = build_manifest([SubsetSpec(folder=folder)], options, tmp_path / "work")
    assert result.dataset["bucket"] == [[512, 512], [512, 512]]
    assert cropped_share([250, 1000], [512, 512]) == pytest.approx(0.75, abs=0.01)
    (warning,) = [w for w in result.report.warnings if "crop" in w]
    assert "pano.png (75% cut to 512x512)" in warning and "1 of 2 image" in warning
    assert "square.png" not in warning and "min_side/max_side" in warning
    assert "warning: the crop cuts" in format_report(result.report, result.buckets, {})


def test_most_images_in_one_bucket_despite_different_shapes_is_named(tmp_path):
    folder = tmp_path / "mixed"
    for i, (h, w) in enumerate([(400, 600), (600, 400), (500, 500), (300, 700), (520, 480)]):
        make_image(folder / f"{i}.png", h, w)
    options = BuildOptions(resolution=512, min_side=512, max_side=512)
    warnings = build_manifest([SubsetSpec(folder=folder)], options, tmp_path / "work").report.warnings
    crowded = [w for w in warnings if "share bucket" in w]
    assert crowded and "5 of 5 images (100%) share bucket 512x512" in crowded[0]
    assert crowded[0].index("3.png") < crowded[0].index("2.png")  # least alike (300x700) first
    # The derived sides give these shapes their own buckets: no warning.
    assert build_manifest([SubsetSpec(folder=folder)], BuildOptions(resolution=512), tmp_path / "w2").report.warnings == []


def test_upscaled_images_are_named(tmp_path):
    folder = tmp_path / "small"
    make_image(folder / "tiny.png", 100, 100)
    make_image(folder / "big.png", 600, 600)
    result = build_manifest([SubsetSpec(folder=folder)], BuildOptions(resolution=512), tmp_path / "work")
    assert result.report.totals["upscaled"] == 1
    assert [(p.rsplit("/", 1)[1], t) for p, t in result.report.upscaled] == [("tiny.png", "upscaled 100x100 -> 512x512")]
    assert "tiny.png: upscaled 100x100 -> 512x512" in format_report(result.report, result.buckets, {})


def test_plan_warnings_skip_flipped_twins():
    row = {"path": "a.png", "original_size": [250, 1000], "bucket": [512, 512], "flip": False}
    assert len(plan_warnings([row, {**row, "flip": True}])) == 1
