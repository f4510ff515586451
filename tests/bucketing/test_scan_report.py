"""Scanning and validation: each bad kind is reported, usable odd files are converted, nothing decoded twice."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from bucketing.image import load_bucket_image, open_image
from bucketing.manifest import BuildOptions, SubsetSpec, build_manifest, load_manifest, save_manifest
from bucketing.scan import scan_folder
from conftest import make_image


def test_odd_modes_are_converted_and_reported(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray((np.arange(64 * 96, dtype=np.uint16).reshape(64, 96) * 10)).save(folder / "deep.png")
    Image.new("P", (80, 60)).save(folder / "palette.png")
    Image.new("RGBA", (60, 60), (255, 0, 0, 0)).save(folder / "clear.png")
    Image.new("CMYK", (70, 50), (0, 255, 0, 0)).save(folder / "print.jpg")
    result = scan_folder(folder)
    assert {r.rel_path for r in result.records} == {"deep.png", "palette.png", "clear.png", "print.jpg"}
    notes = dict(result.notes)
    assert "converted from RGBA" in notes["clear.png"] and "converted from CMYK" in notes["print.jpg"]
    assert open_image(folder / "clear.png", alpha_color=(0, 0, 255)).getpixel((5, 5)) == (0, 0, 255)
    assert max(open_image(folder / "deep.png").getextrema()[0]) > 200  # 16-bit scaled, not clipped


def test_pixel_limit_small_images_duplicates_and_cache(tmp_path):
    folder = tmp_path / "imgs"
    make_image(folder / "big.png", 400, 400)
    make_image(folder / "tiny.png", 20, 30, color=(1, 2, 3))
    make_image(folder / "a.png", 100, 100, color=(9, 9, 9))
    (folder / "copy.png").write_bytes((folder / "a.png").read_bytes())
    cache = tmp_path / "validation.json"
    result = scan_folder(folder, max_pixels=100_000, min_original_side=32, validation_cache=cache)
    problems = dict(result.problems)
    assert "over the limit" in problems["big.png"] and "too small" in problems["tiny.png"]
    kept = {r.rel_path for r in result.records}
    assert len(kept & {"a.png", "copy.png"}) == 1
    assert any("exact duplicate" in note for _, note in result.notes)
    assert result.decoded == 4
    again = scan_folder(folder, max_pixels=100_000, min_original_side=32, validation_cache=cache)
    assert again.decoded == 0 and {r.rel_path for r in again.records} == kept  # nothing decoded twice
    os.utime(folder / "a.png", ns=(1, 1))  # a changed file is validated again
    assert scan_folder(folder, max_pixels=100_000, min_original_side=32, validation_cache=cache).decoded == 1


def test_symlink_loop_is_reported_not_followed(tmp_path):
    folder = tmp_path / "imgs"
    make_image(folder / "sub" / "x.png", 64, 64)
    os.symlink(folder, folder / "sub" / "loop")
    result = scan_folder(folder)
    assert [r.rel_path for r in result.records] == ["sub/x.png"]
    assert any("symlink loop" in reason for _, reason in result.problems)


def test_metadata_jsonl_and_a_saved_dataset_are_sources(tmp_path):
    import datasets

    folder = tmp_path / "imgs"
    make_image(folder / "m.png", 64, 96)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "m.png", "text": "from metadata"}) + "\n")
    table = datasets.Dataset.from_dict({"image": [Image.new("RGB", (96, 64), (5, 5, 5))], "text": ["from a dataset"]})
    table.save_to_disk(str(tmp_path / "hf"))
    options = BuildOptions(resolution=128, min_side=64, max_side=256)
    result = build_manifest([SubsetSpec(folder=folder), SubsetSpec(hf_dataset=tmp_path / "hf", name="hf")],
                            options, work_dir=tmp_path / "work")
    captions = {r["subset"]: r["caption"] for r in result.dataset}
    assert captions == {"imgs": "from metadata", "hf": "from a dataset"}
    save_manifest(result, tmp_path / "manifest")
    assert len(load_manifest(tmp_path / "manifest")) == 2
    assert json.loads((tmp_path / "manifest" / "report.json").read_text())["totals"]["rows"] == 2


def test_bucket_image_is_the_recorded_crop_and_flip(tmp_path):
    path = make_image(tmp_path / "w.png", 100, 200)
    plain = load_bucket_image(path, (64, 64), (0, 32), False)
    flipped = load_bucket_image(path, (64, 64), (0, 128 - 64 - 32), True)
    assert plain.size == (64, 64)
    assert np.array_equal(np.asarray(flipped), np.asarray(plain)[:, ::-1])
