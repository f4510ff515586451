"""Buckets, assignment, sampler and manifest against independent calculations (no torch imported)."""

from __future__ import annotations

import hashlib
import math
import random

import pytest
from PIL import Image

from bucketing.assign import add_time_ids, assign, resized_size
from bucketing.buckets import Bucket, make_buckets, nearest_bucket
from bucketing.manifest import BuildOptions, DatasetError, SubsetSpec, build_manifest
from bucketing.sampler import BucketBatchSampler
from conftest import make_image


def test_buckets_stay_in_budget_and_on_the_grid():
    buckets = make_buckets(1024)
    assert Bucket(1024, 1024) in buckets and Bucket(832, 1216) in buckets and Bucket(1216, 832) in buckets
    for b in buckets:
        assert b.height % 64 == 0 and b.width % 64 == 0
        assert b.height * b.width <= 1024 * 1024
        assert 512 <= min(b.height, b.width) and max(b.height, b.width) <= 2048
        assert 1 / 4 <= b.aspect <= 4
        # widest width for the height: one more step would exceed the budget or the max side
        assert (b.width + 64) * b.height > 1024 * 1024 or b.width + 64 > 2048
    assert make_buckets(1024) == buckets


def test_nearest_bucket_in_log_space():
    buckets = make_buckets(1024)
    for h, w in [(3000, 2000), (1000, 4000), (512, 512), (719, 1280)]:
        chosen = nearest_bucket(h, w, buckets)
        best = min(abs(math.log(b.aspect) - math.log(w / h)) for b in buckets)
        assert abs(math.log(chosen.aspect) - math.log(w / h)) == best


@pytest.mark.parametrize("original", [(3000, 2000), (600, 400), (1000, 1000), (400, 1900)])
def test_assignment_covers_the_bucket_and_centres_the_crop(original):
    a = assign(original, make_buckets(1024))
    bh, bw = a.bucket.size
    scale = max(bh / original[0], bw / original[1])
    assert a.resized_size[0] >= bh and a.resized_size[1] >= bw
    assert abs(a.resized_size[0] - original[0] * scale) <= 1 and abs(a.resized_size[1] - original[1] * scale) <= 1
    assert (a.crop_top, a.crop_left) == ((a.resized_size[0] - bh) // 2, (a.resized_size[1] - bw) // 2)
    assert add_time_ids(original, a.crop_top_left, a.bucket.size) == [*original, a.crop_top, a.crop_left, bh, bw]


def test_flip_mirrors_crop_left_and_random_crop_is_reproducible():
    buckets = make_buckets(1024)
    a = assign((900, 2000), buckets, "random", rng=random.Random(5))
    b = assign((900, 2000), buckets, "random", flip=True, rng=random.Random(5))
    assert b.crop_left == a.resized_size[1] - a.bucket.width - a.crop_left and b.crop_top == a.crop_top
    assert assign((900, 2000), buckets, "random", rng=random.Random(5)) == a
    assert resized_size((100, 100), (1024, 1024)) == (1024, 1024)  # small images are upscaled


def test_sampler_one_shape_per_batch_disjoint_across_processes_and_resumable():
    buckets = [(64, 64)] * 8 + [(64, 128)] * 8 + [(128, 64)] * 4
    seen = []
    for rank in (0, 1):
        sampler = BucketBatchSampler(buckets, batch_size=2, seed=1, num_replicas=2, rank=rank)
        sampler.set_epoch(3)
        batches = list(sampler)
        assert all(len({buckets[i] for i in batch}) == 1 for batch in batches)
        seen.extend(i for batch in batches for i in batch)
    assert sorted(seen) == list(range(20))  # 10 batches: none lost, none twice
    full = BucketBatchSampler(buckets, batch_size=2, seed=1)
    full.set_epoch(2)
    order = list(full)
    resumed = BucketBatchSampler(buckets, batch_size=2, seed=1)
    resumed.load_state_dict({"epoch": 2, "batch_index": 4})
    assert list(resumed) == order[4:]
    other = BucketBatchSampler(buckets, batch_size=2, seed=1)
    other.set_epoch(3)
    assert list(other) != order  # a new shuffle every epoch


def test_sampler_repeats_and_remainder():
    buckets = [(64, 64)] * 3
    carry = BucketBatchSampler(buckets, batch_size=2, seed=0, repeats=[2, 1, 1])
    rows = sorted(i for b in carry for i in b)
    assert rows == [0, 0, 1, 2]
    drop = BucketBatchSampler(buckets, batch_size=2, seed=0, remainder="drop")
    assert [len(b) for b in drop] == [2]


def tree_digest(folder):
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path).encode())
        if path.is_file():
            digest.update(path.read_bytes())
            digest.update(str(path.stat().st_mtime_ns).encode())
    return digest.hexdigest()


def test_manifest_values_exif_and_bad_files(tmp_path):
    folder = tmp_path / "imgs"
    make_image(folder / "wide.png", 300, 600)
    (folder / "wide.txt").write_text("a wide one", encoding="utf-8")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: stored 200 high x 400 wide, seen 400 high x 200 wide
    make_image(folder / "rotated.jpg", 200, 400, exif=exif)
    (folder / "empty.png").write_bytes(b"")
    (folder / "fake.jpg").write_text("not an image")
    truncated = make_image(folder / "cut.png", 300, 300).read_bytes()
    (folder / "cut.png").write_bytes(truncated[: len(truncated) // 2])
    before = tree_digest(folder)
    options = BuildOptions(resolution=256, min_side=128, max_side=512, flip=True)
    result = build_manifest([SubsetSpec(folder=folder)], options, work_dir=tmp_path / "work")
    rows = {(r["path"], r["flip"]): r for r in result.dataset}
    assert set(rows) == {("wide.png", False), ("wide.png", True), ("rotated.jpg", False), ("rotated.jpg", True)}
    wide = rows[("wide.png", False)]
    expected = assign((300, 600), result.buckets)
    assert wide["original_size"] == [300, 600] and wide["bucket"] == list(expected.bucket.size)
    assert wide["crop_top_left"] == [expected.crop_top, expected.crop_left] and wide["caption"] == "a wide one"
    flipped = rows[("wide.png", True)]
    assert flipped["crop_top_left"][1] == expected.resized_size[1] - expected.bucket.width - expected.crop_left
    assert rows[("rotated.jpg", False)]["original_size"] == [400, 200]
    reasons = dict(result.report.problems)
    assert "empty" in reasons["empty.png"] and "not an image" in reasons["fake.jpg"] and "truncated" in reasons["cut.png"]
    assert any("EXIF orientation 6" in note for path, note in result.report.notes if path == "rotated.jpg")
    assert tree_digest(folder) == before  # the user's folder is never written


def test_no_usable_image_is_a_clear_error(tmp_path):
    (tmp_path / "imgs").mkdir()
    with pytest.raises(DatasetError, match="no usable image"):
        build_manifest([SubsetSpec(folder=tmp_path / "imgs")], BuildOptions(), work_dir=tmp_path / "w")
