"""The manifest from images the tests make: every column against an independent calculation."""

from __future__ import annotations

import hashlib
import json
import math
import os
from fractions import Fraction

import pytest

from bucketing.errors import DatasetError
from bucketing.manifest import BuildOptions, SubsetSpec, build_manifest, load_manifest, save_manifest
from conftest import make_image

OPTIONS = dict(resolution=256, bucket_step=64, min_side=128, max_side=512)


def expected_fingerprint(path):
    data = path.read_bytes()
    return f"{len(data)}-{path.stat().st_mtime_ns}-{hashlib.sha256(data[:65536]).hexdigest()[:16]}"


def expected_placement(original, buckets, flip):
    """Nearest bucket by |log aspect difference| (ties: larger), covering size, centre crop, mirrored left."""
    h, w = original
    bucket = min(buckets, key=lambda b: (abs(math.log(b.width / b.height) - math.log(w / h)), -b.height * b.width))
    scale = max(Fraction(bucket.height, h), Fraction(bucket.width, w))
    rh, rw = max(bucket.height, round(h * scale)), max(bucket.width, round(w * scale))
    top, left = (rh - bucket.height) // 2, (rw - bucket.width) // 2
    return [bucket.height, bucket.width], [top, rw - bucket.width - left if flip else left]


@pytest.fixture
def folder(tmp_path, oriented):
    folder = tmp_path / "photos"
    make_image(folder / "wide.png", 300, 600)
    (folder / "wide.txt").write_text("a wide one\n", encoding="utf-8")
    oriented(folder / "rotated.jpg", (200, 400), 6)  # seen as 400 high x 200 wide
    (folder / "rotated.txt").write_bytes("caf\xe9 au lait".encode("cp1252"))
    make_image(folder / "sub" / "square.webp", 90, 90)
    make_image(folder / "sub" / "square_mask.png", 90, 90, color=(255, 255, 255))
    (folder / "empty.png").write_bytes(b"")
    (folder / "fake.jpg").write_text("not an image")
    return folder


def test_rows_match_an_independent_plan(folder, tmp_path, tree_digest):
    before = tree_digest(folder)
    options = BuildOptions(**OPTIONS, flip=True, seed=3)
    result = build_manifest([SubsetSpec(folder=folder, repeats=2, instance_prompt="a photo")], options,
                            work_dir=tmp_path / "work")
    rows = list(result.dataset)
    assert [(r["path"], r["flip"]) for r in rows] == [(p, f) for p in ("rotated.jpg", "wide.png", "sub/square.webp")
                                                      for f in (False, True)]
    originals = {"wide.png": [300, 600], "rotated.jpg": [400, 200], "sub/square.webp": [90, 90]}
    captions = {"wide.png": "a wide one", "rotated.jpg": "café au lait", "sub/square.webp": "a photo"}
    for row in rows:
        bucket, crop = expected_placement(originals[row["path"]], result.buckets, row["flip"])
        assert row == {
            "path": row["path"], "root": str(folder.resolve()), "caption": captions[row["path"]],
            "original_size": originals[row["path"]], "bucket": bucket, "crop_top_left": crop, "flip": row["flip"],
            "subset": "photos", "repeats": 2, "is_regularization": False,
            "fingerprint": expected_fingerprint(folder / row["path"]),
            "mask_path": str(folder / "sub" / "square_mask.png") if row["path"] == "sub/square.webp" else "",
            "aesthetic_score": 6.0,  # the default: no metadata.jsonl score (read by the refiner only)
            "resolution": 256, "loss_weight": None,
        }
    assert tree_digest(folder) == before  # the user's folder is never written, not even touched


def test_report_lists_skipped_files_and_notes(folder, tmp_path):
    result = build_manifest([SubsetSpec(folder=folder)], BuildOptions(**OPTIONS), work_dir=tmp_path / "work")
    problems = dict(result.report.problems)
    assert set(problems) == {str(folder / "empty.png"), str(folder / "fake.jpg")}
    assert problems[str(folder / "empty.png")] == "empty file (0 bytes)"
    notes = result.report.notes
    assert (str(folder / "rotated.jpg"), "EXIF orientation 6 applied (seen as 400x200, h x w)") in notes
    assert any(p == str(folder / "rotated.jpg") and "cp1252" in n for p, n in notes)
    assert any(p == str(folder / "sub/square.webp") and "the folder name gives 'sub'" in n for p, n in notes)
    assert result.report.totals == {"rows": 3, "images": 3, "skipped": 2, "upscaled": 1, "buckets used": 3,
                                    "subset photos": 3}


def test_random_crops_are_seeded_by_image_and_reproducible(tmp_path):
    folder = tmp_path / "imgs"
    for i in range(6):
        make_image(folder / f"{i}.png", 200 + 17 * i, 500)

    def crops(seed):
        options = BuildOptions(**OPTIONS, crop="random", flip=True, seed=seed)
        data = build_manifest([SubsetSpec(folder=folder)], options, work_dir=tmp_path / "w").dataset
        return [(r["path"], r["flip"], tuple(r["crop_top_left"])) for r in data], data
    first, data = crops(1)
    assert crops(1)[0] == first and crops(2)[0] != first
    for row in data:
        (h, w), (bh, bw) = row["original_size"], row["bucket"]
        scale = max(Fraction(bh, h), Fraction(bw, w))
        rh, rw = max(bh, round(h * scale)), max(bw, round(w * scale))
        assert 0 <= row["crop_top_left"][0] <= rh - bh and 0 <= row["crop_top_left"][1] <= rw - bw
    # the seed of an image is its fingerprint: renaming another image does not move this one's crop
    (folder / "5.png").rename(folder / "9.png")
    moved = {(p, f): c for p, f, c in crops(1)[0]}
    assert all(moved[(p, f)] == c for p, f, c in first if p != "5.png")


def test_caption_sources_subsets_and_regularization(tmp_path):
    inst, reg = tmp_path / "10_sks dog", tmp_path / "dogs"
    make_image(inst / "a.png", 64, 64)
    make_image(inst / "b.png", 64, 64, color=(1, 1, 1))
    (inst / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "text": "from metadata"}) + "\n")
    make_image(reg / "r.png", 64, 64, color=(9, 9, 9))
    subsets = [SubsetSpec(folder=inst, caption_prefix="photo"),
               SubsetSpec(folder=reg, name="prior", class_prompt="a dog", is_regularization=True, repeats=3)]
    rows = list(build_manifest(subsets, BuildOptions(**OPTIONS), work_dir=tmp_path / "w").dataset)
    got = {r["path"]: (r["caption"], r["subset"], r["is_regularization"], r["repeats"]) for r in rows}
    assert got == {"a.png": ("photo, sks dog", "10_sks dog", False, 1),
                   "b.png": ("photo, from metadata", "10_sks dog", False, 1),
                   "r.png": ("a dog", "prior", True, 3)}


def test_kohya_repeats_come_from_the_folder_names_when_asked(tmp_path):
    root = tmp_path / "img"
    make_image(root / "10_sks dog" / "a.png", 64, 64)
    make_image(root / "2_dog" / "b.png", 64, 64, color=(1, 1, 1))
    make_image(root / "loose" / "c.png", 64, 64, color=(2, 2, 2))

    def repeats(**subset):
        rows = build_manifest([SubsetSpec(folder=root, **subset)], BuildOptions(**OPTIONS), work_dir=tmp_path / "w").dataset
        return {r["path"]: (r["repeats"], r["caption"]) for r in rows}

    assert repeats(kohya_repeats=True, repeats=3) == {"10_sks dog/a.png": (10, "sks dog"), "2_dog/b.png": (2, "dog"),
                                                      "loose/c.png": (3, "loose")}  # outside: the subset's
    report = build_manifest([SubsetSpec(folder=root, kohya_repeats=True)], BuildOptions(**OPTIONS),
                            work_dir=tmp_path / "w").report
    assert report.totals["samples per epoch"] == 10 + 2 + 1  # what inspect shows a kohya user
    assert {r for r, _ in repeats(repeats=3).values()} == {3}  # off by default: folder names are only captions


def test_rebuild_reads_no_pixels(folder, tmp_path, count_decodes):
    options = BuildOptions(**OPTIONS)
    first = build_manifest([SubsetSpec(folder=folder)], options, work_dir=tmp_path / "work")
    count_decodes.clear()
    again = build_manifest([SubsetSpec(folder=folder)], options, work_dir=tmp_path / "work")
    assert count_decodes == []  # validation served from the cache; planning needs sizes only
    assert list(again.dataset) == list(first.dataset)


def test_save_and_load_replace_the_manifest_atomically(folder, tmp_path):
    result = build_manifest([SubsetSpec(folder=folder)], BuildOptions(**OPTIONS), work_dir=tmp_path / "work")
    out = tmp_path / "out" / "manifest"
    save_manifest(result, out)
    save_manifest(result, out)  # replacing an existing manifest
    assert list(load_manifest(out)) == list(result.dataset)
    assert json.loads((out / "report.json").read_text(encoding="utf-8"))["totals"]["images"] == 3
    assert sorted(p.name for p in out.parent.iterdir()) == ["manifest"]  # no temp folders left
    with pytest.raises(DatasetError, match="dataset build"):
        load_manifest(tmp_path / "nowhere")


def test_unusable_datasets_are_clear_errors(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"bad: no usable image found, 1 file\(s\) skipped \(x.png: empty file"):
        build_manifest([SubsetSpec(folder=tmp_path / "bad")], BuildOptions(), work_dir=tmp_path / "w")
    (tmp_path / "none").mkdir()
    with pytest.raises(DatasetError, match="no usable image found"):
        build_manifest([SubsetSpec(folder=tmp_path / "none")], BuildOptions(), work_dir=tmp_path / "w")
    with pytest.raises(DatasetError, match="image folder not found"):
        build_manifest([SubsetSpec(folder=tmp_path / "missing")], BuildOptions(), work_dir=tmp_path / "w")
    assert issubclass(DatasetError, ValueError)


def test_a_name_that_is_not_utf8_leaves_a_manifest_that_can_be_written(tmp_path):
    make_image(tmp_path / "imgs" / "good.png", 256, 256)
    make_image(tmp_path / "imgs" / "other.png", 256, 256, color=(1, 2, 3))
    os.rename(tmp_path / "imgs" / "other.png", os.fsencode(tmp_path / "imgs") + b"/bad\xff.png")
    result = build_manifest([SubsetSpec(folder=tmp_path / "imgs")], BuildOptions(**OPTIONS), tmp_path / "work")
    assert list(result.dataset["path"]) == ["good.png"]
    assert dict(result.report.problems)[str(tmp_path / "imgs" / "bad\\xff.png")].startswith("file name is not valid")
    save_manifest(result, tmp_path / "manifest")
    assert len(load_manifest(tmp_path / "manifest")) == 1


def test_metadata_lines_naming_no_usable_image_are_reported(tmp_path):
    make_image(tmp_path / "imgs" / "a.png", 256, 256)
    lines = [{"file_name": "a.png", "text": "kept"}, {"file_name": "typo.png", "text": "lost"},
             {"file_name": "../outside.png", "text": "lost too"}]
    (tmp_path / "imgs" / "metadata.jsonl").write_text("\n".join(map(json.dumps, lines)), encoding="utf-8")
    result = build_manifest([SubsetSpec(folder=tmp_path / "imgs")], BuildOptions(**OPTIONS), tmp_path / "work")
    assert list(result.dataset["caption"]) == ["kept"]
    problems = dict(result.report.problems)
    metadata = tmp_path / "imgs" / "metadata.jsonl"
    assert set(problems) == {f"{metadata}:2", f"{metadata}:3"}
    assert "no such file" in problems[f"{metadata}:2"] and "outside the image folder" in problems[f"{metadata}:3"]
