"""`datasets` datasets as a subset: exported once as PNGs into the work dir, captions from a column."""

from __future__ import annotations

import io

import datasets
import pytest
from PIL import Image

from bucketing.errors import DatasetError
from bucketing.export import export_hf_dataset
from bucketing.manifest import BuildOptions, SubsetSpec, build_manifest


def jpeg_with_orientation(size_wh, orientation):
    """Stored bytes (a PIL image given to `datasets` would be re-encoded without its EXIF)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.new("RGB", size_wh, (10, 20, 30)).save(buffer, format="JPEG", exif=exif)
    return {"bytes": buffer.getvalue(), "path": None}


def save_table(path, images, texts):
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": images, "text": texts}, features=features).save_to_disk(str(path))


def test_export_writes_pngs_once_and_drops_stale_ones(tmp_path, count_decodes):
    save_table(tmp_path / "hf", [Image.new("RGB", (96, 64), (5, 5, 5)), Image.new("CMYK", (40, 30)),
                                 jpeg_with_orientation((50, 20), 6)], ["one", None, "three"])
    out = tmp_path / "work" / "hf"
    captions, problems = export_hf_dataset(tmp_path / "hf", out, "image", "text", max_pixels=10**8)
    assert problems == [] and sorted(captions.values()) == ["", "one", "three"]
    names = sorted(captions)
    assert [n[:7] for n in names] == ["000000-", "000001-", "000002-"] and all(n.endswith(".png") for n in names)
    sizes = [Image.open(out / n).size for n in names]
    assert sizes == [(96, 64), (40, 30), (20, 50)]  # EXIF orientation baked in on export
    assert [Image.open(out / n).mode for n in names] == ["RGB", "RGB", "RGB"]
    mtimes = {n: (out / n).stat().st_mtime_ns for n in names}
    count_decodes.clear()
    assert export_hf_dataset(tmp_path / "hf", out, "image", "text", max_pixels=10**8) == (captions, [])
    assert count_decodes == [] and {n: (out / n).stat().st_mtime_ns for n in names} == mtimes
    save_table(tmp_path / "hf2", [Image.new("RGB", (96, 64), (5, 5, 5))], ["one again"])
    again, _ = export_hf_dataset(tmp_path / "hf2", out, "image", "text", max_pixels=10**8)
    assert sorted(p.name for p in out.iterdir()) == list(again) == [names[0]]  # same bytes, same name


def test_oversized_rows_are_problems_not_crashes(tmp_path):
    save_table(tmp_path / "hf", [Image.new("RGB", (100, 100)), Image.new("RGB", (10, 10))], ["big", "small"])
    captions, problems = export_hf_dataset(tmp_path / "hf", tmp_path / "out", "image", "text", max_pixels=5000)
    assert list(captions.values()) == ["small"]
    assert problems == [(f"{tmp_path / 'hf'}[row 0]",
                         "100x100 pixels is over the limit of 5000 (dataset.max_pixels): not exported")]


def test_bad_sources_are_clear_errors(tmp_path):
    datasets.Dataset.from_dict({"image": ["a.png"], "text": ["x"]}).save_to_disk(str(tmp_path / "paths"))
    with pytest.raises(DatasetError, match="not images"):
        export_hf_dataset(tmp_path / "paths", tmp_path / "o", "image", "text", 10**8)
    with pytest.raises(DatasetError, match="no column 'caption'"):
        export_hf_dataset(tmp_path / "paths", tmp_path / "o", "image", "caption", 10**8)
    with pytest.raises(DatasetError, match="save_to_disk"):
        export_hf_dataset(tmp_path / "nothing", tmp_path / "o", "image", "text", 10**8)
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": ["a"], "text": ["b"]})})
    splits.save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(DatasetError, match="several splits"):
        export_hf_dataset(tmp_path / "splits", tmp_path / "o", "image", "text", 10**8)


def test_a_saved_dataset_is_a_subset(tmp_path, tree_digest):
    save_table(tmp_path / "hf", [Image.new("RGB", (96, 64), (5, 5, 5))], ["from a dataset"])
    before = tree_digest(tmp_path / "hf")
    result = build_manifest([SubsetSpec(hf_dataset=tmp_path / "hf", caption_prefix="style")],
                            BuildOptions(resolution=128, min_side=64, max_side=256), work_dir=tmp_path / "work")
    [row] = list(result.dataset)
    assert row["caption"] == "style, from a dataset" and row["subset"] == "hf" and row["original_size"] == [64, 96]
    assert row["root"].startswith(str((tmp_path / "work" / "hf").resolve()))
    assert tree_digest(tmp_path / "hf") == before
